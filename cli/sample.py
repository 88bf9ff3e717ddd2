"""`vqpix sample RUN`: draw new brain slices from the prior and decode them."""

from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--num", type=click.IntRange(min=1), default=16, show_default=True, help="Number of samples."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same samples.")
@click.option(
    "--label",
    type=click.Choice(["AD", "NC"], case_sensitive=False),
    default=None,
    help="Class to sample (conditional prior); default: half NC, half AD.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Softmax temperature; below 1 is more conservative.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the PNGs, the code maps (.npy) and the grid.",
)
def sample(run_dir, num, seed, label, temperature, out_dir) -> None:
    """Sample NUM brain slices from the run RUN into --out."""
    from keras_vqpix.sampling import sample_run

    with user_errors():
        written = sample_run(
            run_dir, out_dir, num_samples=num, seed=seed, label=label, temperature=temperature
        )
    click.echo(f"Wrote {written} samples to {out_dir}")
