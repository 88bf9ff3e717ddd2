"""`vqpix classify RUN`: the conditional prior as an AD/NC classifier (log-likelihood ratio)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import resolve_data, split_option, user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The run's ADNI-layout data folder. Default: the demo data set.",
)
@split_option
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the figures, every slice's and patient's log-likelihood ratio and P(AD), and "
    "the ROC curves to this JSON file.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the ROC figure (per slice and per patient) to this PNG file.",
)
@click.option(
    "--cnn/--no-cnn",
    default=True,
    show_default=True,
    help="Also train the small CNN of `vqpix compare` on the run's training split and report "
    "its figures beside the prior's.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the CNN.")
def classify(run_dir, data, split, json_path, plot_path, cnn, seed) -> None:
    """Classify the slices and patients of a split of DATA as AD or NC with the run's prior.

    Per slice, log p(codes | AD) - log p(codes | NC) under the conditional prior (exact, one
    forward pass per label) with the class prior of the run's training split; per patient,
    the sum over its slices. Prints ROC AUC and balanced accuracy per slice and per patient,
    beside those of the small CNN of `vqpix compare` trained on the same training slices.
    """
    from keras_vqpix.likelihood import (
        classify_run,
        cnn_slice_probabilities,
        format_classification,
        plot_classification,
    )

    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and not path.parent.is_dir():
            raise click.BadParameter(f"folder {path.parent} does not exist", param_hint=option)
    data = resolve_data(data)
    with user_errors():
        result = classify_run(
            run_dir,
            data,
            split=split,
            baseline=cnn_slice_probabilities if cnn else None,
            seed=seed,
        )
    click.echo(format_classification(result))
    if plot_path is not None:
        plot_classification(result, plot_path)
        click.echo(f"Wrote {plot_path}")
    if json_path is not None:
        from keras_vqpix.io import atomic_write_text

        atomic_write_text(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
        click.echo(f"Wrote {json_path}")
