"""`vqpix export RUN`: versioned SavedModels for TensorFlow Serving."""

from __future__ import annotations

from pathlib import Path

import click

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
    help="TF Serving base path: models go to BASE/<name>/<version>/.",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    default=None,
    help="Version number (default: the next free one). An existing version is never overwritten.",
)
def export(run_dir, base, version) -> None:
    """Export the run RUN as SavedModels under --base."""
    from keras_vqpix.export import export_run

    with user_errors():
        paths = export_run(run_dir, base, version=version)
    for path in paths:
        click.echo(f"Exported {path}")
