"""`vqpix anomaly RUN`: where slices look unlike a healthy brain, by the prior's surprise."""

from __future__ import annotations

from pathlib import Path

import click

from .common import split_option, user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.argument(
    "images",
    metavar="[IMAGE]...",
    nargs=-1,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The run's ADNI-layout data folder: score the slices of --split (instead of IMAGEs).",
)
@split_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New folder for the overlays, maps (.npy), scores.csv and anomaly.json.",
)
@click.option(
    "--label",
    type=click.Choice(["NC", "-1"], case_sensitive=False),
    default="NC",
    show_default=True,
    help="The prior's label: NC (healthy) or -1 (unconditional).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Surprise threshold in nats: codes with -log p above it are redrawn. Default: the "
    "99th percentile of the surprise of healthy (NC) validation codes of the run's data; "
    "without that data, -ln 0.005 = 5.30 (p < 0.005, as Pinaya et al. 2022).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the redrawn codes.")
def anomaly(run_dir, images, data, split, out_dir, label, threshold, seed) -> None:
    """Anomaly maps of IMAGE files, or of the --split slices of --data, into --out.

    Per slice: the surprise of each code under the prior (-log p given the codes before it),
    a healed image (the surprising codes redrawn from the prior and decoded) and the residual
    |image - healed| as the pixel anomaly map; a slice score. With lesion masks beside the
    slices (<slice>.mask.npy, e.g. `vqpix demo-data --lesions`), also pixel AUROC, AUPRC,
    best Dice and slice AUROC, beside the VQ-VAE's own residual |image - reconstruction|.
    """
    from keras_vqpix.likelihood import anomaly_run, format_anomaly

    if (data is None) == (not images):
        raise click.UsageError("give either --data DIR or IMAGE files (not both)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise click.BadParameter(
            f"{out_dir} exists and is not empty; choose a new folder", param_hint="--out"
        )
    with user_errors():
        record = anomaly_run(
            run_dir,
            out_dir,
            data_root=data,
            image_paths=images,
            split=split,
            label=label,
            threshold=threshold,
            seed=seed,
            log=click.echo,
        )
    click.echo(format_anomaly(record))
    click.echo(f"Wrote {record['num_slices']} slices' maps to {out_dir}")
