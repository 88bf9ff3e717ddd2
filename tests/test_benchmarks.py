"""`python -m benchmarks --quick`: every section runs and lands in the report (a smoke test, not a measurement)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run, timing

pytestmark = pytest.mark.usefixtures("time_limit")


def test_stats_summarise_repeated_runs():
    stats = timing.Stats((3.0, 1.0, 2.0))
    assert (stats.median, stats.low, stats.high) == (2.0, 1.0, 3.0)
    assert stats.show(2) == "2 (1-3, 3 runs)"
    assert stats.map(lambda s: 6 / s).values == (2.0, 6.0, 3.0)
    assert stats.over(timing.Stats((1.5, 0.5, 1.0))).values == (2.0, 2.0, 2.0)
    calls = []
    times = timing.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert calls == ["a", "b", "a", "b"] and len(times["a"].values) == 2


def test_quick_benchmark_run_writes_every_section(tiny_adni, tmp_path):
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    # The memory section (a subprocess training the VQ-VAE) is left out to keep the test short.
    sections = "training,pipeline,sampling,serving,profile"
    arguments = ["--quick", "--repeats", "1", "--sections", sections, "--data", str(tiny_adni)]
    assert run.main([*arguments, "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    for heading in (
        "## Machine",
        "## Training throughput",
        "## Input pipeline",
        "## Sampling",
        "## Serving latency",
        "## Where a VQ-VAE training step spends its time",
    ):
        assert heading in text
    assert "python -m benchmarks --quick --repeats 1" in text and "load average" in text
    results = json.loads(raw.read_text())["results"]
    sampled = results["sampling"]["quick"]
    assert sampled["identical_codes"] is True
    assert sampled["fast_passes"]["median"] > 0 and sampled["reference_s"]["median"] > 0
    assert results["pipeline"]["quick"]["cached_images_per_s"]["median"] > 0
    assert set(results["serving"]["batches"]) == {"1", "4"}


def test_rejects_an_unknown_section():
    with pytest.raises(SystemExit):
        run.parse_args(["--sections", "training,speed"])


def test_the_stacks_benchmark_replaces_its_own_section(tmp_path):
    from benchmarks import stacks

    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n## Sampling\n\ns\n\n## Synthetic patients\n\nold\n")
    arguments = ["--slices", "2", "--repeats", "1", "--code-size", "6", "--layers", "1"]
    assert stacks.main([*arguments, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n## Sampling\n\ns\n\n## Synthetic patients\n")
    assert "old" not in text and "| wavefront" in text and "with `num_layers=1`" in text
    assert "the same codes: yes" in text  # the wavefront draws the slice-after-slice codes


def test_the_attention_benchmark_times_both_priors_and_replaces_its_section(tmp_path):
    from benchmarks import attention

    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n## Attention in the prior\n\nold\n\n## Serving\n\ns\n")
    arguments = ["--every", "1", "--samples", "2", "--repeats", "1", "--code-size", "4"]
    arguments += ["--layers", "1"]  # 2 gated blocks, each followed by attention
    assert attention.main([*arguments, "--out", str(out)]) == 0
    text = out.read_text()
    assert "old" not in text and text.endswith("## Serving\n\ns\n")
    assert "| with `attention_every=1` (2 attention layers) |" in text
    assert "Run by run, attention / default: training step" in text
