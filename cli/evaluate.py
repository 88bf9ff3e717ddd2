"""`vqpix evaluate RUN`: reconstruction metrics against their trivial baseline, sample statistics."""

from __future__ import annotations

import json
from pathlib import Path

import click

from keras_vqpix.config import SEED_RANGE

from .common import resolve_data, split_option, user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="ADNI-layout folder. Default: the demo data set. A folder that is not the run's own "
    "data (its patients differ from RUN/split.json) is evaluated as external data.",
)
@split_option
@click.option(
    "--samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also draw this many samples from the prior and report sample statistics.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the metrics to this JSON file.",
)
@click.option(
    "--seed",
    type=click.IntRange(*SEED_RANGE),
    default=0,
    show_default=True,
    help="Seed for the samples (an int32).",
)
def evaluate(run_dir, data, split, samples, json_path, seed) -> None:
    """Evaluate the run RUN on a split of DATA, or on external data (external validation)."""
    from keras_vqpix.evaluation import evaluate_run, format_metrics

    data = resolve_data(data)
    with user_errors():
        metrics = evaluate_run(run_dir, data, split=split, num_samples=samples, seed=seed)
    click.echo(format_metrics(metrics))
    if json_path is not None:
        from keras_vqpix.io import atomic_write_text

        atomic_write_text(json_path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        click.echo(f"Wrote {json_path}")
