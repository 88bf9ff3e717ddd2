"""`vqpix generate RUN --out DIR`: a synthetic data set in the ADNI layout (or the VQ-VAE round trip)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from keras_vqpix.config import GENERATE_PER_CLASS, GENERATE_REFINE

from .common import SizeType, first_slices_option, guidance_option, user_errors


@click.command()
@click.argument(
    "run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New folder for {train,test}/{AD,NC}/*.jpeg, manifest.csv and generator.json.",
)
@click.option(
    "--per-class",
    type=click.IntRange(min=1),
    default=GENERATE_PER_CLASS,
    show_default=True,
    help="Slices per class (NC and AD) sampled from the prior.",
)
@click.option(
    "--slices-per-patient",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Slices of each synthetic patient: 1, each slice its own patient; S > 1, whole "
    "patients of S consecutive slices drawn slice after slice (--per-class a multiple of S).",
)
@first_slices_option("--slices-per-patient")
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of each class's patients written to test/.",
)
@guidance_option
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Softmax temperature of the prior; below 1 is more conservative.",
)
@click.option(
    "--size",
    type=SizeType(),
    default=None,
    help="Slice WIDTHxHEIGHT; default: the frame of the slices the run was trained on.",
)
@click.option(
    "--reconstruct",
    "reconstruct_data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    metavar="DATA",
    help="Instead of sampling, write the VQ-VAE reconstruction of every slice of DATA "
    "(same layout, patients prefixed rec-).",
)
@click.option(
    "--noise/--no-noise",
    default=True,
    show_default=True,
    help="Draw MRI acquisition noise (Rician, levels fitted to the run's training slices) on "
    "the decoded slices; --no-noise writes the decoder's noise-free means.",
)
@click.option(
    "--refine",
    type=click.IntRange(min=1),
    default=None,
    metavar="F",
    help="Draw F candidate slices per slice written and keep those a classifier finds most "
    "like the run's training slices (discriminator resampling; 1: off; single slices only). "
    f"Default: {GENERATE_REFINE} for single slices, 1 for whole patients.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.pass_context
def generate(
    ctx,
    run_dir,
    out_dir,
    per_class,
    slices_per_patient,
    first_slices_from,
    guidance,
    test_fraction,
    seed,
    temperature,
    size,
    reconstruct_data,
    noise,
    refine,
    overwrite,
) -> None:
    """Write a synthetic data set drawn from the run RUN into --out, in the ADNI layout.

    OUT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg (8-bit grayscale, each sampled slice its
    own patient syn<seed>-<class>-<n>, or with --slices-per-patient S whole patients of S
    consecutive slices), manifest.csv and generator.json; `vqpix train --data
    OUT` and `vqpix compare OUT --real DATA` read it unchanged. With --reconstruct DATA: the
    VQ-VAE round trip of DATA instead (compare samples against it to judge the prior alone).
    """
    from keras_vqpix.synthetic import default_refine, generate_dataset, reconstruct_dataset

    if reconstruct_data is not None:
        sampling_only = (
            "per_class",
            "slices_per_patient",
            "first_slices_from",
            "guidance",
            "test_fraction",
            "seed",
            "temperature",
            "refine",
        )
        given = [
            name
            for name in sampling_only
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"--{given[0].replace('_', '-')} applies to sampling, not to --reconstruct"
            )
    # The command that reproduces this data set, from the parsed options.
    words = ["vqpix", "generate", str(run_dir), "--out", str(out_dir)]
    if reconstruct_data is not None:
        words += ["--reconstruct", str(reconstruct_data)]
    else:
        words += ["--per-class", str(per_class), "--test-fraction", f"{test_fraction:g}"]
        if slices_per_patient > 1:
            words += ["--slices-per-patient", str(slices_per_patient)]
        if first_slices_from is not None:
            words += ["--first-slices", str(first_slices_from)]
        if guidance is not None:
            words += ["--guidance", f"{guidance:g}"]
        words += ["--seed", str(seed), "--temperature", f"{temperature:g}"]
        if refine is None:
            refine = default_refine(slices_per_patient)
        if refine > 1:
            words += ["--refine", str(refine)]
    if size is not None:
        words += ["--size", f"{size[0]}x{size[1]}"]
    if not noise:
        words += ["--no-noise"]
    command = shlex.join(words)
    with click.progressbar(length=1, label="Generating slices", file=None) as bar:
        done = 0

        def progress(count: int, total: int) -> None:
            nonlocal done
            bar.length = total
            bar.update(count - done)
            done = count

        with user_errors():
            if reconstruct_data is not None:
                summary = reconstruct_dataset(
                    run_dir,
                    reconstruct_data,
                    out_dir,
                    size=size,
                    overwrite=overwrite,
                    command=command,
                    on_progress=progress,
                    noise=noise,
                )
            else:
                summary = generate_dataset(
                    run_dir,
                    out_dir,
                    per_class=per_class,
                    slices_per_patient=slices_per_patient,
                    first_slices_from=first_slices_from,
                    guidance=guidance,
                    test_fraction=test_fraction,
                    seed=seed,
                    temperature=temperature,
                    size=size,
                    overwrite=overwrite,
                    command=command,
                    on_progress=progress,
                    noise=noise,
                    refine=refine,
                )
    click.echo(summary.format())
