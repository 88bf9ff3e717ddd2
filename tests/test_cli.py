"""The `vqpix` command line: help, version, the demo-data default and exit codes for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from keras_vqpix import __version__
from keras_vqpix_cli.main import main


def test_help_lists_every_command_and_every_command_has_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    commands = (
        "demo-data",
        "prepare",
        "train",
        "evaluate",
        "sample",
        "generate",
        "compare",
        "classify",
        "anomaly",
        "export",
    )
    for command in commands:
        assert command in result.output
        sub = CliRunner().invoke(main, [command, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "Usage:" in sub.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert __version__ in result.output


def test_help_does_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from keras_vqpix_cli.main import main; assert 'tensorflow' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("command", [["train", "--config", "quick"], ["evaluate", "RUN"]])
def test_missing_data_folder_exits_2(tmp_path: Path, command):
    (tmp_path / "RUN").mkdir()
    args = [a if a != "RUN" else str(tmp_path / "RUN") for a in command]
    result = CliRunner().invoke(main, [*args, "--data", str(tmp_path / "missing")])
    assert result.exit_code == 2, result.output
    assert "missing" in result.output and "does not exist" in result.output


def test_empty_and_wrongly_laid_out_data_folders_exit_2(tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "train" / "AD").mkdir(parents=True)
    (empty / "test" / "NC").mkdir(parents=True)
    wrong = tmp_path / "wrong"
    (wrong / "train" / "images").mkdir(parents=True)
    for data, message in ((empty, "holds no .jpeg"), (wrong, "no AD or NC subfolder")):
        run = tmp_path / f"run_{data.name}"
        result = CliRunner().invoke(
            main, ["train", "--config", "quick", "--data", str(data), "--out", str(run)]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and "expected ROOT/{train,test}/{AD,NC}" in result.output
        assert len(result.output.strip().splitlines()) == 1, "a one-line error"
        assert not run.exists(), "nothing is written for bad input"


def test_bad_image_size_names_the_option(tiny_adni: Path, tmp_path: Path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--config",
            "quick",
            "--image-size",
            "30",
            "--data",
            str(tiny_adni),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--image-size" in result.output and "divisible" in result.output
    assert not (tmp_path / "r").exists()


def test_train_without_data_uses_the_demo_set(monkeypatch, tiny_adni: Path, tmp_path: Path):
    """No --data: the demo set is generated (once) and handed to training."""
    from keras_vqpix import training
    from keras_vqpix.data import demo

    demo_calls, trained_on = [], []

    def fake_demo(seed: int = 0):
        demo_calls.append(seed)
        return tiny_adni, True

    def fake_train_run(run_dir, data_root, config, **kwargs):
        trained_on.append(Path(data_root))
        return training.TrainResult(Path(run_dir), ["vqvae"])

    monkeypatch.setattr(demo, "ensure_demo_dataset", fake_demo)
    monkeypatch.setattr(training, "train_run", fake_train_run)
    result = CliRunner().invoke(
        main, ["train", "--config", "quick", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert demo_calls and "generated the demo data set" in result.output
    assert trained_on == [tiny_adni]
