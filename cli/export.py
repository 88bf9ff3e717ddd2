"""`vqpix export RUN`: versioned SavedModels for TensorFlow Serving."""

from __future__ import annotations

from pathlib import Path

import click

from keras_vqpix.config import SERVING_MAX_SAMPLES, SERVING_MAX_SLICES

from .common import user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--base",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("exported"),
    show_default=True,
    help="TF Serving base path: models go to BASE/<name>/<version>/, the config to BASE/models.config.",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    default=None,
    help="Version number (default: the next free one). An existing version is never overwritten.",
)
@click.option(
    "--serving-base-path",
    default=None,
    metavar="PATH",
    help="BASE as the server sees it (e.g. /models in a container), for models.config; "
    "default: BASE's absolute path.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1, max=2**31 - 1),
    default=SERVING_MAX_SAMPLES,
    show_default=True,
    metavar="N",
    help="The generator's cap on num_samples per request: more is refused before any work "
    "(the default: about 1-2 s of one CPU core with the default config).",
)
@click.option(
    "--max-slices",
    type=click.IntRange(min=1, max=2**31 - 1),
    default=SERVING_MAX_SLICES,
    show_default=True,
    metavar="S",
    help="The generator's cap on num_slices of sample_patient (one synthetic patient per "
    "request, drawn slice after slice): more is refused before any work.",
)
def export(run_dir, base, version, serving_base_path, max_samples, max_slices) -> None:
    """Export the run RUN as SavedModels under --base, for TensorFlow Serving.

    Writes BASE/vqvae/<version>/ and, when the run has a prior, BASE/vqpix_generator/<version>/,
    and adds both models to BASE/models.config.
    """
    from keras_vqpix.export import export_run

    with user_errors():
        paths = export_run(
            run_dir,
            base,
            version=version,
            serving_base_path=serving_base_path,
            max_samples=max_samples,
            max_slices=max_slices,
            on_note=click.echo,
        )
    for path in paths:
        click.echo(f"Exported {path}")
    click.echo(f"TF Serving config: {Path(base) / 'models.config'}")
