"""Bad options: exit code 2, one line naming the option, before any model or file exists."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from keras_vqpix_cli.main import main

TRAIN_CASES = {
    "zero epochs": (["--epochs", "0"], "--epochs"),
    "zero prior epochs": (["--prior-epochs", "0"], "--prior-epochs"),
    "negative batch size": (["--batch-size", "-4"], "--batch-size"),
    "image size not divisible by the factor 4": (["--image-size", "30"], "--image-size"),
    "image size too small": (["--image-size", "4"], "--image-size"),
    "missing data folder": (["--data", "{tmp}/no_such_data"], "--data"),
    "data folder is a file": (["--data", "{tmp}/file.txt"], "--data"),
    "unknown config": (["--config", "huge"], "--config"),
    "unknown stage": (["--stage", "decoder"], "--stage"),
    "negative seed": (["--seed", "-1"], "--seed"),
    # Beyond int32 the samples of the prior's plot could not be drawn: refused before training.
    "seed beyond int32": (["--seed", str(2**31)], "--seed"),
    "out is a file": (["--out", "{tmp}/file.txt"], "--out"),
    "setting without a value": (["--set", "prior.dropout"], "--set"),
    "setting of an unknown field": (["--set", "prior.dropot=0.1"], "--set"),
    "setting of an unknown section": (["--set", "decoder.filters=8"], "--set"),
    "setting of the wrong type": (["--set", "prior.mirror=yes"], "--set"),
    "setting out of range": (["--set", "prior.dropout=1.5"], "--set"),
}

SAMPLE_CASES = {
    "label MCI": (["--label", "MCI"], "--label"),
    "zero samples": (["--num", "0"], "--num"),
    "negative samples": (["--num", "-3"], "--num"),
    "zero temperature": (["--temperature", "0"], "--temperature"),
    "negative temperature": (["--temperature", "-1.5"], "--temperature"),
    "seed beyond int32": (["--seed", str(2**31)], "--seed"),
    "seed below int32": (["--seed", str(-(2**31) - 1)], "--seed"),
}


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly should a command get as far as training (and so building a model)."""
    import keras_vqpix.training

    def refuse(*args, **kwargs):
        raise AssertionError("train_run was reached")

    monkeypatch.setattr(keras_vqpix.training, "train_run", refuse)


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_train_option_exits_2_naming_it_before_anything_is_written(
    case, tiny_adni, tmp_path, no_training
):
    args, option = TRAIN_CASES[case]
    (tmp_path / "file.txt").write_text("not a folder\n")
    out = tmp_path / "run"
    given = [arg.format(tmp=tmp_path) for arg in args]
    defaults = ["--config", "quick", "--data", str(tiny_adni), "--out", str(out)]
    result = CliRunner().invoke(main, ["train", *defaults, *given])
    assert result.exit_code == 2, result.output
    assert option in error_line(result.output)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_bad_sample_option_exits_2_naming_it_before_anything_is_written(case, tmp_path):
    args, option = SAMPLE_CASES[case]
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "samples"
    result = CliRunner().invoke(main, ["sample", str(run), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert option in error_line(result.output)
    assert not out.exists() and not any(run.iterdir())


def test_negative_evaluate_samples_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--samples", "-1"])
    assert result.exit_code == 2, result.output
    assert "--samples" in error_line(result.output)
    assert not any(tmp_path.iterdir())


def test_train_settings_reach_the_config_as_typed_values(tiny_adni, tmp_path, monkeypatch):
    """`--set` changes exactly the fields named, as JSON values, after the other options."""
    import keras_vqpix.training
    from keras_vqpix.config import get_config

    seen = {}

    def record(run_dir, data, config, **kwargs):
        seen["config"] = config

    monkeypatch.setattr(keras_vqpix.training, "train_run", record)
    args = ["--config", "quick", "--data", str(tiny_adni), "--out", str(tmp_path / "run")]
    settings = ["--set", "prior.dropout=0.25", "--set", "prior.mirror=false"]
    settings += ["--prior-epochs", "3", "--set", "prior.epochs=5", "--set", "data.cache="]
    CliRunner().invoke(main, ["train", *args, *settings])
    quick = get_config("quick")
    expected = quick.replace(
        **{"prior.dropout": 0.25, "prior.mirror": False, "prior.epochs": 5, "data.cache": ""}
    )
    assert seen["config"] == expected != quick


def test_train_help_lists_the_reliability_options():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--overwrite", "--deterministic", "--seed"):
        assert option in result.output


def test_every_seed_option_and_check_agree_on_one_range():
    """One range (keras_vqpix.config) for `train`, `sample`, `evaluate`, RunConfig and the samplers.

    The largest seed `vqpix train` accepts must be one the run's prior plot can sample with: a
    run with `--seed 2**31` used to train both stages, then fail in the plot and exit 2.
    """
    from keras_vqpix.config import RUN_SEED_RANGE, SEED_RANGE, RunConfig
    from keras_vqpix.sampling import check_seed

    def seed_range(command):
        option = next(p for p in main.commands[command].params if p.name == "seed")
        return option.type.min, option.type.max

    assert seed_range("train") == RUN_SEED_RANGE == (0, 2**31 - 1)
    assert seed_range("sample") == seed_range("evaluate") == SEED_RANGE == (-(2**31), 2**31 - 1)
    assert check_seed(RUN_SEED_RANGE[1]) == RunConfig(seed=RUN_SEED_RANGE[1]).seed == 2**31 - 1
    for seed in (2**31, -1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer in 0 .. 2147483647"):
            RunConfig(seed=seed)
    for seed in (2**31, -(2**31) - 1):
        with pytest.raises(ValueError, match="seed must be an int32"):
            check_seed(seed)
