"""`vqpix compare SYNTHETIC --real DATA`: judge a data set against real slices."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import resolve_data, user_errors


@click.command()
@click.argument(
    "synthetic", metavar="SYNTHETIC", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--real",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Real ADNI-layout folder: train/ trains the classifiers, test/ tests them. "
    "Default: the demo data set.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write every figure (and its _down4 twin, spread and per-seed values) to this file.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write ROC curves and synthetic slices beside real ones to this PNG.",
)
@click.option(
    "--plot-patients",
    "patients_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write two synthetic patients beside two real test patients, slice by slice, and the "
    "adjacent-slice SSIM along the stack of both sets, to this PNG.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=None,
    help="Classifier seeds 0..N-1 (default: the CompareConfig's, 3).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs of every classifier (default: the CompareConfig's).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=44),
    default=None,
    help="Side the slices are judged at, a multiple of 4 (default: the CompareConfig's, 128).",
)
@click.option("--quiet", is_flag=True, help="Print only the table.")
def compare(
    synthetic, real, json_path, plot_path, patients_path, seeds, epochs, image_size, quiet
) -> None:
    """Judge the data set SYNTHETIC against the real data set --real.

    Trains small CNNs (several seeds, fixed budget) on the real train patients and tests them on
    the real test patients only: real-vs-synthetic AUC (c2st), AD/NC AUC trained on real (trtr),
    on synthetic (tstr) or both (augmented), the real-trained classifier on synthetic slices
    (fidelity), Frechet and kernel distances in its features (fd, kid beside fd_real, kid_real),
    diversity and memorisation; and for data sets of patients (stacks of consecutive slices)
    the brain SSIM of adjacent slices along the stack beside the real test patients'
    (adjacent_ssim); every figure also after a 4x downsampling (_down4).
    """
    from keras_vqpix.compare import (
        compare_datasets,
        format_comparison,
        plot_comparison,
        plot_stacks,
    )
    from keras_vqpix.config import CompareConfig

    changes = {}
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    if epochs is not None:
        changes["epochs"] = epochs
    if image_size is not None:
        changes["image_size"] = image_size
    try:
        config = CompareConfig(**changes)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--image-size") from error
    real = resolve_data(real)
    with user_errors():
        comparison = compare_datasets(
            synthetic, real, config, log=None if quiet else lambda m: click.echo(m, err=True)
        )
    click.echo(format_comparison(comparison.metrics))
    if json_path is not None:
        from keras_vqpix.io import atomic_write_text

        atomic_write_text(
            json_path, json.dumps(comparison.metrics, indent=2, sort_keys=True) + "\n"
        )
        click.echo(f"Wrote {json_path}")
    if plot_path is not None:
        plot_comparison(
            comparison, plot_path, f"{synthetic} against {real} (first classifier seed)"
        )
        click.echo(f"Wrote {plot_path}")
    if patients_path is not None:
        plot_stacks(comparison, patients_path, f"{synthetic} beside {real} test patients")
        click.echo(f"Wrote {patients_path}")
