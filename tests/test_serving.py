"""The exports under abuse and load: the generator's cap, fuzzed inputs, concurrent clients.

The session's quick run is exported once for this module with a small cap (`QUICK_CAP`). The
fuzzing (`tests/fuzz_exports.py`: a few hundred generated inputs for every signature of both
models, TensorFlow alone) runs in a subprocess under a time limit, in the background while the
load test (`benchmarks/load.py`'s clients, threads in this process) runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vqpix_cli.main import main

pytestmark = [pytest.mark.large, pytest.mark.usefixtures("time_limit")]

QUICK_CAP = 6
QUICK_SLICE_CAP = (
    5  # `sample_patient`'s cap in these tests (the quick prior reads the previous slice)
)
FUZZ_SCRIPT = Path(__file__).with_name("fuzz_exports.py")
FUZZ_TIMEOUT = 300  # seconds: the subprocess is killed (and the test fails) after this
MIB = 2**20


@pytest.fixture(scope="module")
def served(quick_run, tmp_path_factory) -> Path:
    """`export_run(quick_run, BASE, max_samples=QUICK_CAP, max_slices=QUICK_SLICE_CAP)`: BASE."""
    from keras_vqpix.export import export_run

    base = tmp_path_factory.mktemp("served") / "exported"
    export_run(quick_run, base, max_samples=QUICK_CAP, max_slices=QUICK_SLICE_CAP)
    return base


class Fuzz:
    """`tests/fuzz_exports.py` on the export, started in the background."""

    def __init__(self, base: Path, work: Path):
        self.out, self.log = work / "fuzz.json", work / "fuzz.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        args = [
            sys.executable,
            FUZZ_SCRIPT,
            base / "vqvae" / "1",
            base / "vqpix_generator" / "1",
            self.out,
            "--hang-seconds",
            FUZZ_TIMEOUT - 30,
        ]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._report = None

    def report(self) -> dict:
        if self._report is None:
            try:
                code = self.process.wait(timeout=FUZZ_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise AssertionError(f"the fuzzing hung:\n{self.log.read_text()[-4000:]}") from None
            assert code == 0, f"the fuzzing crashed ({code}):\n{self.log.read_text()[-4000:]}"
            self._report = json.loads(self.out.read_text())
        return self._report


@pytest.fixture(scope="module")
def fuzz(served, tmp_path_factory):
    started = Fuzz(served, tmp_path_factory.mktemp("fuzz"))
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


def test_the_cap_is_in_the_readme_and_config_json(served, quick_run, fuzz):
    folder = served / "vqpix_generator" / "1"
    readme = (folder / "README").read_text()
    assert f"num_samples int32 scalar, 1 .. {QUICK_CAP}" in readme
    assert f"num_samples above {QUICK_CAP} is refused" in readme
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("serving") == {
        "max_samples": QUICK_CAP,
        "max_slices": QUICK_SLICE_CAP,
        "sampler": "fast",
    }
    assert f"num_slices int32 scalar, 1 .. {QUICK_SLICE_CAP}" in readme
    assert config == json.loads((quick_run / "config.json").read_text())
    # The VQ-VAE's version has no cap: its config.json is the run's, unchanged.
    vqvae_config = (served / "vqvae" / "1" / "config.json").read_text()
    assert vqvae_config == (quick_run / "config.json").read_text()


@pytest.mark.parametrize("value", ["0", "-3", "2147483648", "many"])
def test_export_refuses_a_bad_max_samples_before_any_work(quick_run, tmp_path, value):
    base = tmp_path / "exported"
    result = CliRunner().invoke(
        main, ["export", str(quick_run), "--base", str(base), "--max-samples", value]
    )
    assert result.exit_code == 2, result.output
    assert "--max-samples" in result.output
    assert not base.exists()


def test_export_run_refuses_a_bad_max_samples(quick_run, tmp_path):
    from keras_vqpix.export import export_run

    for value in (0, 2**31, 1.5, True, "8"):
        with pytest.raises(ValueError, match="--max-samples must be an integer in 1 .. 2"):
            export_run(quick_run, tmp_path / "exported", max_samples=value)
    assert not (tmp_path / "exported").exists()


def test_concurrent_clients_get_every_answer_and_memory_stays_bounded(served, fuzz):
    """The short load test: 4 client threads, a mix of all four signatures for 3 s."""
    from benchmarks.load import Exports, run_load

    exports = Exports(served)
    assert exports.max_samples == QUICK_CAP
    load = run_load(exports, threads=4, seconds=3.0, batch=4)
    print(json.dumps(load["signatures"], indent=1, default=float))
    print(f"RSS {load['rss_before_bytes'] / MIB:.0f} -> {load['rss_after_bytes'] / MIB:.0f} MiB")
    assert load["errors"] == 0, load["error_examples"]
    for name, row in load["signatures"].items():
        assert row["requests"] >= 3 and row["errors"] == 0, (name, row)
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], (name, row)
        assert 1 <= row["mean_items"] <= (QUICK_CAP if name == "sample" else 4)
    assert load["rss_growth_bytes"] < 64 * MIB


def test_the_oversized_request_is_refused_at_once_with_memory_unchanged(fuzz):
    """num_samples = cap + 1, 10^8 and 2^31 - 1: each refused in well under a second, and
    neither the resident nor the peak memory of the process moves (10^8 quick samples would
    need ~430 GB)."""
    probes = fuzz.report()["oversized"]
    assert [p["num_samples"] for p in probes] == [QUICK_CAP + 1, 10**8, 2**31 - 1]
    for probe in probes:
        print(
            f"num_samples {probe['num_samples']}: refused in {probe['seconds'] * 1000:.1f} ms, "
            f"RSS {probe['rss_growth_bytes'] / MIB:+.2f} MiB, peak {probe['peak_growth_bytes'] / MIB:+.2f} MiB"
        )
        assert f"num_samples must be <= {QUICK_CAP}, the cap per request" in probe["error"]
        assert probe["seconds"] < 0.5
        assert probe["rss_growth_bytes"] < 4 * MIB
        assert probe["peak_growth_bytes"] < 4 * MIB


# Words each kind of refusal must contain: the input it names.
NAMED = {
    "value": {
        "images": "images must be float32 in [0, 1]",
        "codes": "codes must be in [0, ",
        "num_samples": "num_samples must be",
        "num_slices": "num_slices must be",
        "temperature": "temperature must be a finite number > 0",
        "label": "label must be -1",
    },
    "rank": "Shape of tensor {field}",
    "shape": "Shape of tensor {field}",
}


def test_fuzzed_inputs_are_refused_or_answered_never_a_crash_or_hang(fuzz):
    report = fuzz.report()
    results = report["results"]
    assert report["keras_vqpix_imported"] is False
    # Each version's warm-up file holds one good request per signature, and each is answered.
    warmup = report["warmup"]
    assert [(r["model"], r["signature"]) for r in warmup["vqvae"]] == [
        ("vqvae", "serving_default"),
        ("vqvae", "encode"),
        ("vqvae", "decode"),
    ]
    assert [(r["model"], r["signature"]) for r in warmup["generator"]] == [
        ("vqpix_generator", "sample"),
        ("vqpix_generator", "serving_default"),
        ("vqpix_generator", "sample_patient"),
    ]
    assert not [r for rows in warmup.values() for r in rows if r["error"]], warmup
    failed = [r for r in results if not r["passed"]]
    assert not failed, json.dumps(failed[:10], indent=1)
    # A few hundred inputs over every signature of both models, bad and good.
    assert len(results) >= 300
    covered = {(r["model"], r["signature"]) for r in results}
    assert covered == {
        ("vqvae", "serving_default"),
        ("vqvae", "encode"),
        ("vqvae", "decode"),
        ("generator", "sample"),
        ("generator", "serving_default"),
        ("generator", "sample_patient"),
    }
    expected = [r["expect"] for r in results]
    assert expected.count("refused") >= 250 and expected.count("ok") >= 30
    assert expected.count("empty") >= 3
    families = {r["family"] for r in results if r["expect"] == "refused"}
    assert families >= {"dtype", "rank", "shape", "value", "name", "random"}
    # Each refusal names what was wrong.
    for r in results:
        if r["expect"] != "refused" or r["family"] not in NAMED:
            continue
        words = NAMED[r["family"]]
        words = words[r["field"]] if isinstance(words, dict) else words.format(field=r["field"])
        assert words in r["error"], r
    # Refused at once; answered in time (the slowest good call draws QUICK_CAP maps).
    refusals = [r["seconds"] for r in results if r["error"]]
    print(
        f"{len(results)} inputs in {report['seconds']:.1f} s; refusals: median "
        f"{np.median(refusals) * 1000:.1f} ms, max {max(refusals) * 1000:.0f} ms"
    )
    assert max(refusals) < 1.0
    assert max(r["seconds"] for r in results) < 10.0


def test_good_inputs_at_the_edges_succeed(fuzz):
    """num_samples 1 and the cap; temperatures from float32's smallest normal number to its
    largest; int32's extreme seeds; every label: all answered, outputs of the right shape and
    range (checked in the subprocess: `wrong_output` is empty)."""
    results = fuzz.report()["results"]
    good = [r for r in results if r["family"] == "good"]
    assert all(r["passed"] and not r["error"] and not r["wrong_output"] for r in good), good
    names = {(r["model"], r["signature"], r["name"]) for r in good}
    for index in range(2 + 6 + 3 + 3):  # n = 1, n = cap, 6 temperatures, 3 seeds, 3 labels
        assert ("generator", "sample", f"good_{index}") in names
    assert ("generator", "serving_default", "good_cap") in names
    for index in range(4):  # num_slices 1 and the cap, the tiniest temperature, int32's least seed
        assert ("generator", "sample_patient", f"good_{index}") in names
    # Empty batches: an empty answer of the right shape, never an error or a wrong answer.
    empty = [r for r in results if r["family"] == "empty"]
    assert len(empty) == 3 and all(r["passed"] and not r["error"] for r in empty), empty


def test_the_load_report_replaces_its_own_section_of_results_md():
    from benchmarks.load import HEADING, replace_section, section_of

    old = f"# Benchmarks\n\n## Sampling\n\ns\n\n{HEADING}\n\nold figures\n\n## Memory\n\nm\n"
    new = replace_section(old, f"{HEADING}\n\nnew figures\n")
    assert (
        new == f"# Benchmarks\n\n## Sampling\n\ns\n\n{HEADING}\n\nnew figures\n\n## Memory\n\nm\n"
    )
    assert section_of(new).strip() == f"{HEADING}\n\nnew figures"
    # `python -m benchmarks` rewrites the file: the section is carried over, or appended.
    fresh = "# Benchmarks\n\n## Sampling\n\ns2\n"
    kept = replace_section(fresh, section_of(new))
    assert kept == f"# Benchmarks\n\n## Sampling\n\ns2\n\n{HEADING}\n\nnew figures\n"
    assert section_of(fresh) == ""
