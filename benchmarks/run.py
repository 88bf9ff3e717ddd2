"""Measure keras_vqpix on this machine and write `benchmarks/RESULTS.md`.

    python -m benchmarks                 # everything, both configs: several minutes
    python -m benchmarks --quick         # a smoke run: tiny sizes, seconds to a minute

Sections (`--sections`, comma-separated; default all):

- `training`: VQ-VAE training steps (images/s) and PixelCNN training steps (code maps/s) per
  config, the compiled `train_step` on one batch, as `fit` runs it (no XLA).
- `pipeline`: images/s the `tf.data` training pipeline delivers (first epoch: decoding;
  later epochs: from the in-memory cache), consumed in graph mode as `fit` does, against
  what a VQ-VAE training step consumes.
- `sampling`: the fast and the reference sampler against one forward pass of the prior, and
  the old sampler (the prior's whole-map `call` at every position) from its first rows.
- `serving`: latency of a SavedModel `serving_default` (images -> reconstruction, codes) of
  the VQ-VAE, batch 1 and 32.
- `memory`: peak RSS of a process training the default VQ-VAE (`benchmarks/rss.py`).
- `profile`: the parts of a default VQ-VAE training step (`benchmarks/profile_vqvae.py`).

Every figure is the median of `--repeats` runs with the lowest and highest; figures compared
with each other are timed in alternation and their ratio taken run by run. Models have
random weights: the cost of a step or of a sample does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import load, stacks
from benchmarks.timing import Stats, alternate, load_average, machine

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("training", "pipeline", "sampling", "serving", "memory", "profile")


@dataclass
class Settings:
    """What to measure and how often (`--quick` shrinks everything)."""

    quick: bool = False
    repeats: int = 5
    configs: tuple[str, ...] = ("quick", "default")
    train_steps: dict = field(default_factory=lambda: {"quick": 20, "default": 5})
    pipeline_epochs: int = 3
    samples: int = 16
    sampling_configs: tuple[str, ...] = ("quick", "default")
    sampling_code_size: int | None = None  # None: the config's code map
    reference_repeats: int = 3
    old_sampler_rows: int = 2
    serving_batches: tuple[int, ...] = (1, 32)
    serving_calls: int = 10
    rss_config: str = "default"
    rss_steps: int = 20

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            quick=True,
            repeats=2,
            configs=("quick",),
            train_steps={"quick": 3, "default": 1},
            pipeline_epochs=1,
            samples=2,
            sampling_configs=("quick",),
            sampling_code_size=4,
            reference_repeats=1,
            old_sampler_rows=1,
            serving_batches=(1, 4),
            serving_calls=2,
            rss_config="quick",
            rss_steps=2,
        )


# -- Training -----------------------------------------------------------------------------------------
def vqvae_batch(config, data_root):
    from benchmarks.profile_vqvae import training_batch

    return training_batch(config, data_root)


def measure_training(settings: Settings, data_root) -> dict:
    """Images/s of VQ-VAE and code maps/s of PixelCNN training steps, per config."""
    return {name: _training(name, settings, data_root) for name in settings.configs}


def _training(name: str, settings: Settings, data_root) -> dict:
    import numpy as np
    import tensorflow as tf

    from keras_vqpix.config import get_config
    from keras_vqpix.training.prior_training import build_prior
    from keras_vqpix.training.vqvae_training import build_vqvae

    config = get_config(name)
    steps = settings.train_steps[name]
    images = vqvae_batch(config, data_root)
    vqvae = build_vqvae(config)
    vqvae_step = tf.function(vqvae.train_step, reduce_retracing=True)
    prior = build_prior(config)
    prior_step = tf.function(prior.train_step, reduce_retracing=True)
    rng = np.random.default_rng(0)
    batch, size = config.prior.batch_size, config.code_size
    codes = rng.integers(0, config.vqvae.num_embeddings, (batch, size, size))
    prior_data = (tf.constant(codes, tf.int32), tf.constant(rng.integers(0, 2, batch), tf.int32))

    def run(step, data):
        def go():
            for _ in range(steps):
                logs = step(data)
            float(logs["loss"])  # the last step has finished

        go()  # trace and warm up
        return go

    times = alternate(
        {"vqvae": run(vqvae_step, images), "prior": run(prior_step, prior_data)},
        settings.repeats,
    )
    images_per_step = int(images.shape[0])
    return {
        "vqvae_batch": images_per_step,
        "image_size": int(images.shape[1]),
        "vqvae_images_per_s": times["vqvae"].map(lambda s: steps * images_per_step / s),
        "vqvae_step_s": times["vqvae"].map(lambda s: s / steps),
        "prior_batch": batch,
        "code_size": size,
        "prior_maps_per_s": times["prior"].map(lambda s: steps * batch / s),
        "prior_step_s": times["prior"].map(lambda s: s / steps),
    }


# -- Input pipeline -----------------------------------------------------------------------------------
def measure_pipeline(settings: Settings, data_root, training: dict | None) -> dict:
    """Images/s of the training pipeline: its first epoch (decoding) and later ones (cache)."""
    import tensorflow as tf

    @tf.function
    def consume(iterator, batches):
        # In graph mode, as `fit` reads its data: no Python per batch.
        count = tf.constant(0)
        for _ in tf.range(batches):
            images, _ = next(iterator)
            count += tf.shape(images)[0]
        return count

    results = {}
    for name in settings.configs:
        results[name] = _pipeline(name, settings, data_root, consume)
        if training and name in training:
            entry, consumed = results[name], training[name]["vqvae_images_per_s"].median
            entry["step_images_per_s"] = consumed
            entry["cached_over_step"] = entry["cached_images_per_s"].median / consumed
            entry["first_over_step"] = entry["first_epoch_images_per_s"].median / consumed
    return results


def _pipeline(name: str, settings: Settings, data_root, consume) -> dict:
    from keras_vqpix.config import get_config
    from keras_vqpix.data.discover import discover_splits
    from keras_vqpix.data.pipeline import steps_per_epoch
    from keras_vqpix.training.vqvae_training import training_dataset

    config = get_config(name)
    data = config.data
    splits = discover_splits(data_root, data.validation_fraction, config.seed)
    epoch = steps_per_epoch(len(splits.train), data.batch_size)
    first, later = [], []
    for _ in range(settings.repeats):
        dataset = training_dataset(splits.train, config)
        iterator = iter(dataset)
        for batches, rates in ((epoch, first), (settings.pipeline_epochs * epoch, later)):
            start = time.perf_counter()
            count = int(consume(iterator, batches))
            rates.append(count / (time.perf_counter() - start))
    return {
        "train_images": len(splits.train),
        "batch_size": data.batch_size,
        "image_size": data.image_size,
        "first_epoch_images_per_s": Stats(tuple(first)),
        "cached_images_per_s": Stats(tuple(later)),
    }


# -- Sampling -----------------------------------------------------------------------------------------
class _WholeMapPrior:
    """The prior seen only through its `call`: what the reference sampler did before the steps
    (one forward pass of the whole map per position)."""

    def __init__(self, prior):
        self.prior = prior
        self.conditional = prior.conditional
        self.num_classes = prior.num_classes
        self.code_shape = prior.code_shape

    def __call__(self, codes, labels=None, training=False):
        return self.prior(codes, labels, training=training)


def measure_sampling(settings: Settings) -> dict:
    """Seconds per batch of the fast and reference samplers, and of one forward pass."""
    return {name: _sampling(name, settings) for name in settings.sampling_configs}


def _sampling(name: str, settings: Settings) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vqpix import sampling
    from keras_vqpix.config import get_config
    from keras_vqpix.models.pixelcnn import PixelCNN

    config = get_config(name)
    size = settings.sampling_code_size or config.code_size
    keras.utils.set_random_seed(0)
    prior = PixelCNN.from_run_config(
        config.prior, config.vqvae.num_embeddings, code_shape=(size, size)
    )
    n = settings.samples
    labels = sampling.resolve_labels(prior, n)
    codes = tf.constant(
        np.random.default_rng(0).integers(0, prior.num_embeddings, (n, size, size)), tf.int32
    )
    forward = tf.function(lambda c, lab: prior(c, lab, training=False))

    def one_pass():
        forward(codes, labels).numpy()

    def fast():
        return sampling.sample_codes_fast(prior, n, 0, labels)

    one_pass()
    fast_codes = fast()  # trace and warm up
    times = alternate({"forward": one_pass, "fast": fast}, settings.repeats)

    # The reference: its row function traced (and row 0 drawn) once before timing.
    empty = tf.zeros((n, size, size), tf.int32)
    no_context = (tf.fill((n, size, size), -1), tf.fill((n,), -1))  # no previous slice, position
    arguments = (tf.constant(labels), *no_context, tf.constant(0), tf.constant(1.0))
    no_guidance = tf.constant(1.0)  # unused: the row sampler is traced without guidance
    sampling._row_sampler(prior, size, size)(
        empty, *arguments, tf.constant(0), tf.constant(0), no_guidance
    )
    reference_codes = []

    def reference():
        reference_codes.append(sampling.sample_codes_reference(prior, n, 0, labels))

    reference_times = alternate(
        {"forward": one_pass, "reference": reference}, settings.reference_repeats
    )
    # The old sampler: every position costs one whole-map forward pass, so its first rows
    # tell its time per row.
    whole_map = _WholeMapPrior(prior)  # the sampler's cache holds it weakly: keep it alive
    old_row = sampling._row_sampler(whole_map, size, size)
    old_row(empty, *arguments, tf.constant(0), tf.constant(0), no_guidance)
    rows = settings.old_sampler_rows

    def old_rows():
        for row in range(rows):
            old_row(empty, *arguments, tf.constant(row), tf.constant(0), no_guidance).numpy()

    old_times = alternate({"forward": one_pass, "rows": old_rows}, settings.reference_repeats)
    old_map = old_times["rows"].map(lambda s: s / rows * size)
    return {
        "code_size": size,
        "num_embeddings": prior.num_embeddings,
        "blocks": len(prior.blocks),
        "filters": prior.filters,
        "samples": n,
        "forward_s": times["forward"],
        "fast_s": times["fast"],
        "fast_passes": times["fast"].over(times["forward"]),
        "reference_s": reference_times["reference"],
        "reference_passes": reference_times["reference"].over(reference_times["forward"]),
        "reference_over_fast": reference_times["reference"].median / times["fast"].median,
        "identical_codes": all(np.array_equal(c, fast_codes) for c in reference_codes),
        "old_rows_timed": rows,
        "old_map_s": old_map,
        "old_passes": old_map.over(old_times["forward"]),
    }


# -- Serving ------------------------------------------------------------------------------------------
def measure_serving(settings: Settings) -> dict:
    """Latency of a SavedModel `serving_default` of the VQ-VAE, per batch size."""
    import numpy as np
    import tensorflow as tf

    from keras_vqpix.config import get_config
    from keras_vqpix.training.vqvae_training import build_vqvae

    name = "quick" if settings.quick else "default"
    config = get_config(name)
    size = config.data.image_size
    model = build_vqvae(config)
    module = tf.Module()
    module.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, "images")])
    def serve(images):
        outputs = model(images, training=False)
        return {"reconstruction": outputs["reconstruction"], "codes": outputs["codes"]}

    module.serve = serve
    results = {"config": name, "image_size": size, "batches": {}}
    with tempfile.TemporaryDirectory() as folder:
        tf.saved_model.save(module, folder, signatures={"serving_default": serve})
        signature = tf.saved_model.load(folder).signatures["serving_default"]
        rng = np.random.default_rng(0)
        calls = {}
        for batch in settings.serving_batches:
            images = tf.constant(rng.uniform(size=(batch, size, size, 1)).astype(np.float32))

            def call(images=images):
                for _ in range(settings.serving_calls):
                    signature(images=images)["codes"].numpy()

            call()  # warm up
            calls[batch] = call
        times = alternate(calls, settings.repeats)
        for batch, stats in times.items():
            results["batches"][batch] = stats.map(lambda s: s / settings.serving_calls)
    return results


# -- Memory -------------------------------------------------------------------------------------------
def measure_memory(settings: Settings, data_root) -> dict:
    """Peak RSS of a separate process training the VQ-VAE for a few steps."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.rss",
        "--config",
        settings.rss_config,
        "--steps",
        str(settings.rss_steps),
        "--data",
        str(data_root),
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env=environment, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -- Profile ------------------------------------------------------------------------------------------
def measure_profile(settings: Settings, data_root) -> dict:
    from benchmarks.profile_vqvae import part_times
    from keras_vqpix.config import get_config

    name = "quick" if settings.quick else "default"
    config = get_config(name)
    images = vqvae_batch(config, data_root)
    return {
        "config": name,
        "batch": int(images.shape[0]),
        "image_size": int(images.shape[1]),
        "parts": part_times(config, images, settings.repeats, calls=1 if settings.quick else 3),
    }


# -- Report -------------------------------------------------------------------------------------------
def _ms(stats: Stats, digits: int = 3) -> str:
    return stats.show(digits, 1000)


def report(results: dict, info: dict, settings: Settings, command: str, timing: dict) -> str:
    lines = [
        "# keras_vqpix benchmarks",
        "",
        f"Written by `{command}` (`python -m benchmarks --help` for the options); "
        f"{'a quick smoke run: tiny sizes, not representative' if settings.quick else 'full run'}. "
        f"It took {timing['seconds'] / 60:.1f} min. Figures: median (lowest-highest, runs); "
        "ratios are taken run by run between measurements made in alternation. "
        "Models have random weights (the cost of a step or a sample does not depend on them).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in info.items()],
        f"| load average (1, 5, 15 min) at start | {timing['load_start']} |",
        f"| load average at end | {timing['load_end']} |",
        "",
        "The machine is shared: the load average counts other users' processes too, and "
        "absolute times vary with it; ratios measured in alternation vary less.",
    ]
    if "training" in results:
        lines += [
            "",
            "## Training throughput",
            "",
            "The compiled `train_step` on one batch, as `fit` runs it (graph mode, no XLA).",
            "",
            "| config | VQ-VAE batch | VQ-VAE images/s | VQ-VAE step (ms) | prior batch "
            "| prior code maps/s | prior step (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, entry in results["training"].items():
            size, codes = entry["image_size"], entry["code_size"]
            lines.append(
                f"| {name} | {entry['vqvae_batch']} x {size}x{size} "
                f"| {entry['vqvae_images_per_s'].show()} | {_ms(entry['vqvae_step_s'])} "
                f"| {entry['prior_batch']} x {codes}x{codes} "
                f"| {entry['prior_maps_per_s'].show()} | {_ms(entry['prior_step_s'])} |"
            )
    if "pipeline" in results:
        lines += [
            "",
            "## Input pipeline",
            "",
            "Images/s that `make_dataset` (the training pipeline: parallel decode, in-memory "
            "cache, per-epoch shuffle, batching, prefetch) delivers, read in graph mode as `fit` "
            "reads it, on its own (not while a step runs). The first epoch decodes and resizes "
            "every JPEG; later epochs read the cache. *Feeds* is the step rate the cached "
            "pipeline could sustain at the config's batch size: a training step faster than "
            "1 / that (e.g. on a GPU) would wait for data.",
            "",
            "| config | images | first epoch images/s | cached images/s | feeds (steps/s) "
            "| VQ-VAE step consumes images/s | cached / step | first epoch / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in results["pipeline"].items():
            cached = entry["cached_images_per_s"]
            step = entry.get("step_images_per_s")
            versus = (
                [
                    f"{step:.3g}",
                    f"{entry['cached_over_step']:.0f}x",
                    f"{entry['first_over_step']:.1f}x",
                ]
                if step
                else ["n/a"] * 3
            )
            lines.append(
                f"| {name} | {entry['train_images']} x {entry['image_size']}px "
                f"| {entry['first_epoch_images_per_s'].show()} | {cached.show()} "
                f"| {cached.median / entry['batch_size']:.0f} | {' | '.join(versus)} |"
            )
    if "sampling" in results:
        lines += [
            "",
            "## Sampling",
            "",
            "Seconds to draw a batch of code maps, and per sample; *passes*: the time as a "
            "multiple of one forward pass of the prior over a batch of the same maps (graph mode), "
            "timed in alternation. The fast and the reference samplers draw the same codes (checked "
            "in this run). *Old sampler*: the reference as it was before the cached steps, one "
            "whole-map forward pass (the prior's `call`) per position; every position costs the "
            "same, so its time per row is measured over its first rows and multiplied by the rows "
            "of the map.",
            "",
            "| config | prior | maps | one forward pass (ms) | fast (s) | fast per sample (s) "
            "| fast (passes) | reference (s) | reference (passes) | reference / fast "
            "| old sampler (s, from its first rows) | old (passes) | same codes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in results["sampling"].items():
            size = entry["code_size"]
            lines.append(
                f"| {name} | {entry['blocks']} blocks x {entry['filters']}, K = "
                f"{entry['num_embeddings']} | {entry['samples']} x {size}x{size} "
                f"| {_ms(entry['forward_s'])} | {entry['fast_s'].show()} "
                f"| {entry['fast_s'].median / entry['samples']:.3g} "
                f"| {entry['fast_passes'].show()} | {entry['reference_s'].show()} "
                f"| {entry['reference_passes'].show()} | {entry['reference_over_fast']:.0f}x "
                f"| {entry['old_map_s'].show()} ({entry['old_rows_timed']} of {size} rows) "
                f"| {entry['old_passes'].show()} | {'yes' if entry['identical_codes'] else 'NO'} |"
            )
    if "serving" in results:
        entry = results["serving"]
        size = entry["image_size"]
        lines += [
            "",
            "## Serving latency",
            "",
            f"`serving_default` (images -> reconstruction, codes) of the {entry['config']} VQ-VAE "
            f"({size}x{size}), saved with `tf.saved_model.save` and reloaded by this benchmark "
            "(the same signature as `vqpix export`'s `vqvae` model), called from Python.",
            "",
            "| batch | latency (ms) | images/s |",
            "|---|---|---|",
        ]
        for batch, stats in entry["batches"].items():
            lines.append(
                f"| {batch} | {_ms(stats)} | {stats.map(lambda s, b=batch: b / s).show()} |"
            )
    if "memory" in results:
        entry = results["memory"]
        lines += [
            "",
            "## Memory",
            "",
            f"Peak RSS of a process training the {entry['config']} VQ-VAE for {entry['steps']} "
            f"steps (batch {entry['batch_size']} of {entry['image_size']}px) on "
            f"{entry['train_images']} training slices, with the training pipeline (its shuffle "
            "buffer holds the whole split and the cache every decoded slice after the first "
            f"step): **{entry['peak_rss_bytes'] / 2**20:.0f} MiB** (`benchmarks/rss.py`, "
            f"`ru_maxrss`; {entry['seconds']:.0f} s).",
        ]
    if "profile" in results:
        entry = results["profile"]
        lines += [
            "",
            "## Where a VQ-VAE training step spends its time",
            "",
            f"The parts of the {entry['config']} VQ-VAE's `train_step` (batch {entry['batch']} of "
            f"{entry['image_size']}px), each its own compiled function on the same batch "
            "(`benchmarks/profile_vqvae.py`; `--trace DIR` also writes a profiler trace). The "
            "parts overlap a little in the whole step (two threads run independent ops).",
            "",
            "| part | ms |",
            "|---|---|",
            *[f"| {part} | {_ms(stats)} |" for part, stats in entry["parts"].items()],
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure keras_vqpix on this machine and write benchmarks/RESULTS.md.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 5)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--data", default=None, help="ADNI-layout folder; default: the demo set")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="the Markdown report"
    )
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args, sections


def _jsonable(value):
    if isinstance(value, Stats):
        return {"median": value.median, "low": value.low, "high": value.high, "runs": value.values}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def main(argv=None) -> int:
    args, sections = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = Settings.smoke() if args.quick else Settings()
    if args.repeats is not None:
        settings.repeats = args.repeats
        settings.reference_repeats = min(settings.reference_repeats, args.repeats)
    started, load_start = time.perf_counter(), load_average()
    info = machine()
    data_root = args.data
    if data_root is None and {"training", "pipeline", "memory", "profile"} & set(sections):
        from keras_vqpix.data.demo import ensure_demo_dataset

        data_root = ensure_demo_dataset()[0]
    results: dict = {}
    for section in sections:
        print(f"[benchmarks] {section} (load average {load_average()})", flush=True)
        section_start = time.perf_counter()
        if section == "training":
            results[section] = measure_training(settings, data_root)
        elif section == "pipeline":
            results[section] = measure_pipeline(settings, data_root, results.get("training"))
        elif section == "sampling":
            results[section] = measure_sampling(settings)
        elif section == "serving":
            results[section] = measure_serving(settings)
        elif section == "memory":
            results[section] = measure_memory(settings, data_root)
        elif section == "profile":
            results[section] = measure_profile(settings, data_root)
        print(f"[benchmarks] {section}: {time.perf_counter() - section_start:.0f} s", flush=True)
    timing = {
        "seconds": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": load_average(),
    }
    text = report(results, info, settings, command, timing)
    if Path(args.out).exists():  # keep the sections `benchmarks.load` and `.stacks` wrote
        previous = Path(args.out).read_text()
        for heading in (load.HEADING, stacks.HEADING):
            kept = load.section_of(previous, heading)
            text = load.replace_section(text, kept, heading) if kept else text
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.json:
        payload = {"command": command, "machine": info, **timing, "results": _jsonable(results)}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[benchmarks] wrote {args.out} ({timing['seconds'] / 60:.1f} min)")
    return 0
