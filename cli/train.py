"""`vqpix train`: train the VQ-VAE, then the PixelCNN prior on its codes."""

from __future__ import annotations

from pathlib import Path

import click

from keras_vqpix.config import PRESETS, RUN_SEED_RANGE

from .common import InputError, parse_settings, resolve_data, user_errors


@click.command()
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="ADNI-layout folder (ROOT/{train,test}/{AD,NC}/*.jpeg). Default: the demo data set.",
)
@click.option(
    "--out",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/default"),
    show_default=True,
    help="Run folder for config, checkpoints, history, logs and plots.",
)
@click.option(
    "--config",
    "config_name",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="Preset: quick (tiny, seconds), default (the real model), patients (the default with a "
    "prior that also reads the previous slice: draws whole synthetic patients), or an earlier "
    "default prior, for the ablation: default-short (10 prior epochs, no dropout), "
    "default-positionless (and without slice positions), "
    "default-unmirrored (and without the mirror images of its maps), default-undilated (and "
    "with vertical stacks not dilated).",
)
@click.option(
    "--stage",
    type=click.Choice(["vqvae", "prior", "all"]),
    default="all",
    show_default=True,
    help="Train the VQ-VAE, the prior on an existing VQ-VAE run, or both.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="VQ-VAE epochs (default: the config's).",
)
@click.option(
    "--prior-epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Prior epochs (default: the config's).",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Change one field of the config, as named in a run's config.json; repeatable. VALUE is "
    "read as JSON (a number, true, false), else as text. E.g. --set prior.dropout=0.1 "
    "--set prior.filters=64 (applied after the other options).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Global batch size (default: the config's).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    default=None,
    help="Side of the square images; must be divisible by the downsampling factor.",
)
@click.option(
    "--seed",
    type=click.IntRange(*RUN_SEED_RANGE),
    default=0,
    show_default=True,
    help="Seed of the split, shuffling, initialisation and the plots' samples (0 .. 2**31 - 1).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a run of another config in --out instead of refusing.",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Use only deterministic TensorFlow kernels (tf.config.experimental."
    "enable_op_determinism): identical results on GPU too, somewhat slower there. "
    "CPU runs are deterministic for a --seed without it.",
)
@click.option(
    "--strategy",
    type=click.Choice(["auto", "none", "mirrored", "multiworker"]),
    default="auto",
    show_default=True,
    help="Devices to train on: mirrored (every GPU of this machine), multiworker (the machines "
    "TF_CONFIG lists; run the same command on each), none (one device), auto (mirrored with "
    "more than one GPU, else none). --batch-size stays the global batch.",
)
@click.option(
    "--mixed-precision",
    is_flag=True,
    help="Compute in mixed_float16 on GPUs (with loss scaling), mixed_bfloat16 on CPUs; the "
    "codebook, quantizer distances and losses stay float32. Recorded in config.json: resume "
    "with the same setting.",
)
@click.pass_context
def train(
    ctx,
    data,
    run_dir,
    config_name,
    stage,
    epochs,
    prior_epochs,
    settings,
    batch_size,
    image_size,
    seed,
    overwrite,
    deterministic,
    strategy,
    mixed_precision,
) -> None:
    """Train on --data (default: the demo set) into the run folder --out.

    Run again with the same options to resume after an interruption; --epochs may grow.
    Exit codes: 0 done, 2 bad options or input (nothing written), 1 training failed or
    diverged (the run folder keeps its last complete epoch).
    """
    from keras_vqpix.config import get_config
    from keras_vqpix.run_folder import RunPaths, read_config
    from keras_vqpix.training.distribute import make_cluster, precision_policy

    # First of all: a multi-worker strategy must exist before TensorFlow runs anything.
    try:
        cluster = make_cluster(strategy)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--strategy") from error

    base = None
    given = {
        name
        for name in ("config_name", "seed", "batch_size", "image_size")
        if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
    }
    if stage == "prior" and not given and RunPaths(run_dir).config.is_file():
        # Training the prior of an existing run: take the run's own config.
        with user_errors():
            base = read_config(RunPaths(run_dir))
        seed = base.seed
    overrides = {"seed": seed}
    if mixed_precision or base is None:
        overrides["precision"] = precision_policy(mixed_precision)
    if epochs is not None:
        overrides["vqvae.epochs"] = epochs
    if prior_epochs is not None:
        overrides["prior.epochs"] = prior_epochs
    if batch_size is not None:
        overrides["data.batch_size"] = batch_size
    if image_size is not None:
        overrides["data.image_size"] = image_size
    try:
        config = (base or get_config(config_name)).replace(**overrides)
    except ValueError as error:
        param = "--image-size" if "image_size" in str(error) else "--config"
        raise click.BadParameter(str(error), param_hint=param) from error
    try:
        config = config.replace(**parse_settings(settings))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--set") from error
    data = resolve_data(data)

    from keras_vqpix.training import DistributedRunError, train_run
    from keras_vqpix.training.callbacks import TrainingDivergedError

    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    try:
        with user_errors():
            result = train_run(
                run_dir, data, config, stage=stage, overwrite=overwrite, cluster=cluster
            )
    except TrainingDivergedError as error:
        click.echo()  # end the line Keras' progress bar left open
        raise click.ClickException(
            f"training diverged: {error}. {run_dir} keeps the checkpoint and best model of the "
            "last complete epoch; start again with another --seed, in a new --out or with --overwrite"
        ) from error
    except DistributedRunError as error:
        raise click.ClickException(str(error)) from error
    if result is None:
        raise InputError("nothing was trained")
    click.echo(result.summary())
