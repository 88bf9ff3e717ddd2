"""`vqpix prepare`: turn ADNI NIfTI volumes and a diagnosis CSV into the slice layout."""

from __future__ import annotations

from pathlib import Path

import click

from .common import SizeType, user_errors

PLANES = ("axial", "coronal", "sagittal")


@click.command()
@click.option(
    "--volumes",
    "volumes_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder searched recursively for .nii / .nii.gz volumes (skull-stripped, registered).",
)
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="CSV with a subject column (Subject/PTID) and a diagnosis column (Group/DX).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New data folder for {train,test}/{AD,NC}/*.jpeg and manifest.csv.",
)
@click.option(
    "--slices",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Consecutive slices per volume, centred on the brain.",
)
@click.option(
    "--plane",
    type=click.Choice(PLANES),
    default="axial",
    show_default=True,
    help="Slicing plane (radiological display convention).",
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of each class's subjects written to test/.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subject split.")
@click.option(
    "--size",
    type=SizeType(),
    default="256x240",
    show_default=True,
    help="Image WIDTHxHEIGHT in pixels; the aspect ratio is kept and padded with black.",
)
@click.option(
    "--include-mci",
    is_flag=True,
    help="Label MCI/EMCI/LMCI subjects AD (impaired vs normal) instead of skipping them.",
)
@click.option(
    "--subject-column",
    default=None,
    help="Name of the subject column if it is not Subject, Subject ID or PTID.",
)
@click.option(
    "--label-column",
    default=None,
    help="Name of the diagnosis column if it is not Group, DX_bl, DX or Diagnosis.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--quiet", is_flag=True, help="Print only skipped files and the summary.")
def prepare(
    volumes_dir,
    labels_csv,
    out_dir,
    slices,
    plane,
    test_fraction,
    seed,
    size,
    include_mci,
    subject_column,
    label_column,
    overwrite,
    quiet,
) -> None:
    """Slice ADNI NIfTI volumes into the data layout, split by subject.

    Every volume is reoriented to RAS, cut into --slices consecutive slices centred on the
    brain, scaled to 8 bits and written as OUT/{train,test}/{AD,NC}/<subject>_<number>.jpeg;
    a subject's later visits add 1000 per visit to the slice number. Unreadable volumes,
    unlabelled subjects and MCI subjects are skipped and counted in the summary.
    """
    from keras_vqpix.data.adni import prepare_adni

    def log(message: str) -> None:
        if message.startswith("skipped"):
            click.echo(message, err=True)
        elif not quiet:
            click.echo(message)

    with user_errors():
        summary = prepare_adni(
            volumes_dir,
            labels_csv,
            out_dir,
            slices=slices,
            plane=plane,
            test_fraction=test_fraction,
            seed=seed,
            size=size,
            include_mci=include_mci,
            overwrite=overwrite,
            subject_column=subject_column,
            label_column=label_column,
            log=log,
        )
    click.echo(summary.format())
