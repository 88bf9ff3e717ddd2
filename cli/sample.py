"""`vqpix sample RUN`: draw new brain slices from the prior and decode them."""

from __future__ import annotations

from pathlib import Path

import click

from keras_vqpix.config import SEED_RANGE

from .common import first_slices_option, guidance_option, user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--num", type=click.IntRange(min=1), default=16, show_default=True, help="Number of samples."
)
@click.option(
    "--seed",
    type=click.IntRange(*SEED_RANGE),
    default=0,
    show_default=True,
    help="Same seed, same samples (an int32).",
)
@click.option(
    "--label",
    type=click.Choice(["AD", "NC", "none"], case_sensitive=False),
    default=None,
    help="Class to sample (conditional prior), or none: unconditional (label -1). "
    "Default: half NC, half AD (an unconditional prior: none).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Softmax temperature; below 1 is more conservative.",
)
@guidance_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the PNGs, the code maps (.npy) and the grid.",
)
@click.option(
    "--patient",
    is_flag=True,
    help="Draw NUM whole synthetic patients (stacks of --slices consecutive slices, each "
    "slice drawn given the previous one), each written as a strip; needs a prior that reads "
    "the previous slice (the patients config).",
)
@first_slices_option("--patient")
@click.option(
    "--slices",
    type=click.IntRange(min=1, max=512),
    default=20,
    show_default=True,
    help="Slices of each patient with --patient.",
)
@click.pass_context
def sample(
    ctx,
    run_dir,
    num,
    seed,
    label,
    temperature,
    guidance,
    out_dir,
    patient,
    first_slices_from,
    slices,
) -> None:
    """Sample NUM brain slices (or with --patient NUM whole patients) from the run RUN into --out.

    The same seed, label and temperature give the same code maps (.npy) and images.
    """
    if not patient and ctx.get_parameter_source("slices") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--slices applies to --patient only")
    from keras_vqpix.sampling import UNCONDITIONAL, sample_run

    if label is not None and label.lower() == "none":
        label = UNCONDITIONAL

    label_text = "Sampling patients" if patient else "Sampling code rows"
    with RowProgress(label_text) as progress, user_errors():
        written = sample_run(
            run_dir,
            out_dir,
            num_samples=num,
            seed=seed,
            label=label,
            temperature=temperature,
            on_row=progress.update,
            slices_per_patient=slices if patient else None,
            guidance=guidance,
            first_slices_from=first_slices_from,
        )
    click.echo(f"Wrote {written} {'patients' if patient else 'samples'} to {out_dir}")


class RowProgress:
    """A click progress bar over the rows of the code maps, opened at the first row drawn."""

    def __init__(self, label: str = "Sampling code rows"):
        self.label = label
        self.bar = None
        self.done = 0

    def update(self, rows_done: int, rows: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=rows, label=self.label, file=None)
            self.bar.__enter__()
        self.bar.update(rows_done - self.done)
        self.done = rows_done

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.__exit__(*exc_info)
