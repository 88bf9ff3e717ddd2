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
@click.option(
    "--lesions",
    is_flag=True,
    help="Add synthetic lesions (bright or dark blobs in white or grey matter) to about half "
    "of the test slices, and write each test slice's mask beside it (<slice>.mask.npy), "
    "to measure `vqpix anomaly`.",
)
def demo_data(out: Path, seed: int, patients_per_class: int, lesions: bool) -> None:
    """Write a synthetic ADNI-like data set of brain slices into OUT.

    OUT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg, 256x240 8-bit grayscale, about 20
    consecutive axial slices per patient, derived from the MNI152 template. With --lesions
    the set is the same but for the lesions in the test slices.
    """
    from keras_vqpix.data import demo

    if out.exists() and any(out.iterdir()):
        raise click.BadParameter(
            f"{out} exists and is not empty; choose a new folder.", param_hint="OUT"
        )
    with user_errors():
        summary = demo.generate_demo_dataset(
            out, seed=seed, train_patients_per_class=patients_per_class, lesions=lesions
        )
    click.echo(f"Wrote {summary['images']} slices of {summary['patients']} patients to {out}")
    if lesions:
        counts = summary["lesions"]
        click.echo(
            f"Lesions: {counts['lesions']} in {counts['slices_with_lesions']} of "
            f"{counts['test_slices']} test slices; masks beside them (<slice>.mask.npy)"
        )
