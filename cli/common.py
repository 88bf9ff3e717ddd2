"""Shared pieces of the commands: exit codes, error translation, the demo-data default."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import click


class InputError(click.ClickException):
    """Bad input found by looking at it (a data folder, a run folder): exit code 2."""

    exit_code = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into one-line click errors with the right exit code.

    `ValueError`s raised by configs and data discovery name the option or file at fault, so
    they become exit code 2; anything else propagates (exit 1 through `main`).
    """
    from keras_vqpix.data.discover import DatasetLayoutError

    try:
        yield
    except (DatasetLayoutError, FileNotFoundError, FileExistsError) as error:
        raise InputError(_one_line(error)) from error
    except ValueError as error:
        raise InputError(_one_line(error)) from error


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


def parse_settings(settings: tuple[str, ...]) -> dict[str, object]:
    """`{"prior.dropout": 0.1}` of `("prior.dropout=0.1",)`: each VALUE read as JSON, else as text.

    Raises:
        ValueError: for a setting without `=` or without a key.
    """
    changes: dict[str, object] = {}
    for text in settings:
        key, equals, raw = text.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{text!r} is not SECTION.FIELD=VALUE (e.g. prior.dropout=0.1)")
        try:
            changes[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key.strip()] = raw
    return changes


def resolve_data(data: Path | None, seed: int = 0) -> Path:
    """`--data` as given, or the demo set (generated into the cache on first use)."""
    if data is not None:
        return data
    from keras_vqpix.data import demo

    root, created = demo.ensure_demo_dataset()
    if created:
        click.echo(
            f"No --data given: generated the demo data set into {root} (once; reused from now on)."
        )
    else:
        click.echo(f"No --data given: using the demo data set in {root}.")
    return root


class SizeType(click.ParamType):
    """`WxH` in pixels, e.g. `256x240` -> (256, 240), PIL's (width, height) order."""

    name = "WxH"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
        if not match or min(int(match[1]), int(match[2])) < 1:
            self.fail(
                f"expected WIDTHxHEIGHT in pixels such as 256x240. Received: {value!r}",
                param,
                ctx,
            )
        return int(match[1]), int(match[2])


# `--split` of the commands that evaluate a run on a `--data` folder (evaluate, classify,
# anomaly): a split of the run's own data, or the test/ folder or every slice of external data
# (`keras_vqpix.evaluation.evaluation_records`).
split_option = click.option(
    "--split",
    type=click.Choice(["test", "val", "train", "all"]),
    default="test",
    show_default=True,
    help="test, val or train split of the run's own data; of external data: its test/ folder "
    "(test) or every slice in it (all).",
)

# Classifier-free guidance of `vqpix sample` and `vqpix generate` (`keras_vqpix.sampling`).
guidance_option = click.option(
    "--guidance",
    type=click.FloatRange(min=0.0),
    default=None,
    metavar="W",
    help="Classifier-free guidance weight: the logits u + W (c - u) of the class (c) and "
    "unconditional (u) prior; W > 1 strengthens the class (up to twice the sampling time). "
    "Default: none (W = 1).",
)


def first_slices_option(whole_patients: str):
    """`--first-slices FIRST_RUN` of `vqpix generate` and `vqpix sample` (`whole_patients`: the
    option that asks for patients), `keras_vqpix.sampling.load_first_prior`."""
    return click.option(
        "--first-slices",
        "first_slices_from",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        metavar="FIRST_RUN",
        help=f"With {whole_patients}: draw each patient's first slice with the per-slice prior "
        "of FIRST_RUN (a run of the same VQ-VAE, e.g. the default config's), the later slices "
        "with RUN's.",
    )
