"""`vqpix demo-data OUT`: synthesise the demo data set in the ADNI layout."""

from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Random seed; the same seed gives identical files.",
)
@click.option(
    "--patients-per-class",
    type=click.IntRange(min=2),
    default=40,
    show_default=True,
    help="Train patients per class (AD, NC); the test folder gets a quarter as many.",
)
def demo_data(out: Path, seed: int, patients_per_class: int) -> None:
    """Write a synthetic ADNI-like data set of brain slices into OUT.

    OUT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg, 256x240 8-bit grayscale, about 20
    consecutive axial slices per patient, derived from the MNI152 template.
    """
    from keras_vqpix.data import demo

    if out.exists() and any(out.iterdir()):
        raise click.BadParameter(
            f"{out} exists and is not empty; choose a new folder.", param_hint="OUT"
        )
    with user_errors():
        summary = demo.generate_demo_dataset(
            out, seed=seed, train_patients_per_class=patients_per_class
        )
    click.echo(f"Wrote {summary['images']} slices of {summary['patients']} patients to {out}")
