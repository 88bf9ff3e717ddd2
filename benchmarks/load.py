"""The exported models under concurrent load, as TF Serving runs them, and the generator's cap.

    python -m benchmarks.load BASE [--version N] [--threads 4] [--seconds 60] [--results FILE]

`BASE` is a `vqpix export` base (`BASE/vqvae/<N>/`, `BASE/vqpix_generator/<N>/`). The two
SavedModels are loaded once with TensorFlow alone (this module never imports keras_vqpix), then:

1. **Cap**: the latency of `sample` for 1, 2, 4, ... maps up to twice the export's cap, one
   client at a time: what one request of each size costs, hence which cap a server can afford.
2. **Oversized**: `sample` with `num_samples` = cap + 1 and 10^8, timed, with the resident and
   peak memory of the process before and after (a refused request must allocate nothing).
3. **Load**: `--threads` client threads (as TF Serving's request threads call one loaded model)
   send a random mix of `sample` (1 .. cap maps), `serving_default`, `encode` and `decode`
   (batches of 1 .. `--batch` images or code maps) for `--seconds`. Per signature: requests,
   errors, requests/s, items/s, latency p50/p95/p99; resident memory after a warm-up (every
   client calls each signature at its largest size, all clients at once), at the end and its
   peak, sampled every 50 ms.

Exits 1 when any load request failed, when a good request was refused or a bad one not, or when
the resident memory grew by more than `--rss-bound` MiB over the load phase. `--results` adds
(or replaces) the "## Serving under load" section of a Markdown file (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

HEADING = "## Serving under load"
SIGNATURES = ("sample", "serving_default", "encode", "decode")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's resident memory now (Linux `/proc/self/statm`; else its peak)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far (`ru_maxrss`: KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def percentiles(values) -> dict[str, float]:
    """p50, p95, p99 and max of `values` (seconds), in milliseconds."""
    if not len(values):
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.asarray(values) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": ms.max()}


class Exports:
    """The two SavedModels of one export version, loaded once, and valid inputs for them."""

    def __init__(self, base: Path, version: int | None = None):
        import tensorflow as tf

        self.tf = tf
        base = Path(base)
        if version is None:
            versions = [
                int(p.name) for p in (base / "vqpix_generator").iterdir() if p.name.isdigit()
            ]
            version = max(versions)
        self.version = version
        self.vqvae_dir = base / "vqvae" / str(version)
        self.generator_dir = base / "vqpix_generator" / str(version)
        config = json.loads((self.generator_dir / "config.json").read_text())
        self.max_samples = int(config["serving"]["max_samples"])
        self.config_name = config.get("name", "?")
        vqvae = tf.saved_model.load(str(self.vqvae_dir))
        generator = tf.saved_model.load(str(self.generator_dir))
        self._models = (vqvae, generator)  # the signatures need their models alive
        self.functions = {
            "sample": generator.signatures["sample"],
            "serving_default": vqvae.signatures["serving_default"],
            "encode": vqvae.signatures["encode"],
            "decode": vqvae.signatures["decode"],
        }
        images = self.functions["encode"].structured_input_signature[1]["images"]
        codes = self.functions["decode"].structured_input_signature[1]["codes"]
        self.image_shape = tuple(images.shape[1:])
        self.code_shape = tuple(codes.shape[1:])
        self.conditional = bool(config["prior"]["conditional"])
        self.num_embeddings = int(config["vqvae"]["num_embeddings"])  # codes of decode: [0, K)
        readme = (self.generator_dir / "README").read_text().splitlines()[0]
        self.run = readme.split(" of the run ", 1)[-1].rstrip(".")

    def inputs(self, signature: str, size: int, rng: random.Random) -> dict:
        """Valid inputs of `signature` for `size` maps or images."""
        tf = self.tf
        if signature == "sample":
            label = rng.choice((-1, 0, 1)) if self.conditional else -1
            return {
                "num_samples": tf.constant(size, tf.int32),
                "seed": tf.constant(rng.randrange(-(2**31), 2**31), tf.int32),
                "temperature": tf.constant(rng.choice((0.5, 1.0, 1.5)), tf.float32),
                "label": tf.constant(label, tf.int32),
            }
        generator = np.random.default_rng(rng.randrange(2**32))
        if signature == "decode":
            codes = generator.integers(0, self.num_embeddings, (size, *self.code_shape))
            return {"codes": tf.constant(codes, tf.int32)}
        return {"images": tf.constant(generator.random((size, *self.image_shape), np.float32))}

    def call(self, signature: str, inputs: dict):
        outputs = self.functions[signature](**inputs)
        return {key: value.numpy() for key, value in outputs.items()}


def measure_cap(exports: Exports, repeats: int) -> list[dict]:
    """Seconds per `sample` request of 1, 2, 4, ... maps up to twice the cap (one client)."""
    sizes = sorted(
        {1, exports.max_samples} | {2**i for i in range(12) if 2**i <= exports.max_samples}
    )
    rng = random.Random(0)
    rows = []
    for size in sizes:
        exports.call("sample", exports.inputs("sample", size, rng))  # first call of this size
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            exports.call("sample", exports.inputs("sample", size, rng))
            seconds.append(time.perf_counter() - start)
        median = float(np.median(seconds))
        rows.append(
            {
                "num_samples": size,
                "median_s": median,
                "low_s": float(min(seconds)),
                "high_s": float(max(seconds)),
                "maps_per_s": size / median,
                "runs": len(seconds),
            }
        )
    return rows


def measure_oversized(exports: Exports) -> list[dict]:
    """`sample` with num_samples above the cap: how fast it is refused, and the memory it took."""
    tf = exports.tf
    rows = []
    for size in (exports.max_samples + 1, 10**8, 2**31 - 1):
        inputs = exports.inputs("sample", 1, random.Random(1))
        inputs["num_samples"] = tf.constant(size, tf.int32)
        rss, peak = resident_bytes(), peak_resident_bytes()
        start = time.perf_counter()
        try:
            exports.call("sample", inputs)
            error = ""
        except Exception as failure:  # what a client of the server would get back
            error = type(failure).__name__ + ": " + " ".join(str(failure).split())
        seconds = time.perf_counter() - start
        rows.append(
            {
                "num_samples": size,
                "seconds": seconds,
                "refused": bool(error),
                "message": error[:300],
                "rss_growth_bytes": resident_bytes() - rss,
                "peak_growth_bytes": peak_resident_bytes() - peak,
            }
        )
    return rows


def run_load(
    exports: Exports,
    threads: int,
    seconds: float,
    batch: int,
    mix: dict[str, float] | None = None,
    seed: int = 0,
) -> dict:
    """`threads` clients calling a random mix of the signatures for `seconds` (see the module
    docstring); latencies per signature, errors, and the resident memory before/after/peak."""
    mix = mix or {name: 1.0 for name in SIGNATURES}
    names, weights = list(mix), [mix[name] for name in mix]
    largest = {
        "sample": exports.max_samples,
        "serving_default": batch,
        "encode": batch,
        "decode": batch,
    }

    def warm_up(index: int) -> None:
        warm = random.Random(seed - 1 - index)
        for name in names:
            exports.call(name, exports.inputs(name, largest[name], warm))

    # Every client calls every signature at its largest size, all at once: the allocators reach
    # what `threads` concurrent requests hold, so growth over the load phase is a leak, not the
    # working set of concurrency (a wider prior's is larger).
    warmers = [threading.Thread(target=warm_up, args=(i,)) for i in range(threads)]
    for warmer in warmers:
        warmer.start()
    for warmer in warmers:
        warmer.join()
    rss_before = resident_bytes()
    records: dict[str, list] = {name: [] for name in names}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    rss_seen = [rss_before]

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while not stop.is_set():
            name = rng.choices(names, weights)[0]
            size = rng.randint(1, largest[name])
            inputs = exports.inputs(name, size, rng)
            start = time.perf_counter()
            try:
                outputs = exports.call(name, inputs)
                first = next(iter(outputs.values()))
                if first.shape[0] != size:
                    raise AssertionError(f"{name}: {first.shape[0]} results for {size} inputs")
            except Exception as failure:
                with lock:
                    errors.append(f"{name}({size}): {type(failure).__name__}: {failure}"[:500])
                continue
            with lock:
                records[name].append((time.perf_counter() - start, size))

    def monitor() -> None:
        while not stop.wait(0.05):
            rss_seen.append(resident_bytes())

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    watcher = threading.Thread(target=monitor)
    started = time.perf_counter()
    for worker in [*workers, watcher]:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in [*workers, watcher]:
        worker.join()
    elapsed = time.perf_counter() - started  # includes finishing the requests in flight
    rss_after = resident_bytes()
    per_signature = {}
    for name in names:
        latencies = [latency for latency, _ in records[name]]
        items = sum(size for _, size in records[name])
        per_signature[name] = {
            "requests": len(latencies),
            "errors": sum(e.startswith(f"{name}(") for e in errors),
            "requests_per_s": len(latencies) / elapsed,
            "items_per_s": items / elapsed,
            "mean_items": items / max(len(latencies), 1),
            **percentiles(latencies),
        }
    return {
        "threads": threads,
        "seconds": elapsed,
        "batch": batch,
        "max_samples": exports.max_samples,
        "requests": sum(len(r) for r in records.values()),
        "errors": len(errors),
        "error_examples": errors[:5],
        "signatures": per_signature,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_peak_bytes": max(rss_seen + [rss_after]),
        "rss_growth_bytes": rss_after - rss_before,
    }


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def report(results: dict) -> str:
    """The "## Serving under load" section (Markdown)."""
    load, cap = results["load"], results["max_samples"]
    lines = [
        HEADING,
        "",
        f"Written by `{results['command']}` ({results['minutes']:.1f} min, load average "
        f"{results['load_average']} at the start; {results['machine']}). The exports of the run "
        f"`{results['run']}` (config `{results['config']}`, images {results['image_shape']}, "
        f"code maps {results['code_shape']}), version {results['version']}, loaded once with "
        "TensorFlow alone (`tf.saved_model.load`, as TF Serving's loader) in one process.",
        "",
        f"### `sample` latency by request size (one client; the export's cap: {cap})",
        "",
        "| num_samples | seconds per request | maps/s |",
        "|---|---|---|",
    ]
    for row in results["cap"]:
        lines.append(
            f"| {row['num_samples']} | {row['median_s']:.3g} ({row['low_s']:.3g}-{row['high_s']:.3g}, "
            f"{row['runs']} runs) | {row['maps_per_s']:.3g} |"
        )
    lines += [
        "",
        "### Oversized requests",
        "",
        "| num_samples | refused | seconds | resident memory growth (MiB) | peak growth (MiB) |",
        "|---|---|---|---|---|",
    ]
    for row in results["oversized"]:
        lines.append(
            f"| {row['num_samples']} | {'yes' if row['refused'] else '**no**'} | "
            f"{row['seconds']:.4f} | {row['rss_growth_bytes'] / 2**20:.1f} | "
            f"{row['peak_growth_bytes'] / 2**20:.1f} |"
        )
    if results["oversized"]:
        lines += ["", f"Message: `{results['oversized'][0]['message'][:240]}`"]
    lines += [
        "",
        f"### {load['threads']} concurrent clients for {load['seconds']:.0f} s",
        "",
        "A random mix, equal weights: `sample` of 1 .. "
        f"{cap} maps, `serving_default` / `encode` / `decode` of 1 .. {load['batch']} images or "
        f"code maps per request. **{load['requests']} requests, {load['errors']} errors.**",
        "",
        "| signature | requests | errors | requests/s | items/s | mean items | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in load["signatures"].items():
        lines.append(
            f"| {name} | {row['requests']} | {row['errors']} | {row['requests_per_s']:.3g} | "
            f"{row['items_per_s']:.3g} | {row['mean_items']:.2g} | {row['p50_ms']:.0f} | "
            f"{row['p95_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    lines += [
        "",
        f"Resident memory: {_mib(load['rss_before_bytes'])} MiB after the warm-up, "
        f"{_mib(load['rss_after_bytes'])} MiB at the end (growth "
        f"{load['rss_growth_bytes'] / 2**20:+.1f} MiB; bound {results['rss_bound_mib']} MiB), "
        f"peak {_mib(load['rss_peak_bytes'])} MiB during the load.",
        "",
    ]
    return "\n".join(lines)


def replace_section(text: str, section: str, heading: str = HEADING) -> str:
    """`text` (Markdown) with its `heading` section (up to the next `## `) replaced by
    `section`, or `section` appended when there is none."""
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    end = text.find("\n## ", start + len(heading))
    rest = "" if end < 0 else text[end + 1 :]
    return text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")


def print_section(section: str, heading: str, out: Path | None) -> None:
    """Print the Markdown `section` and, with `out`, write it into that file in place of its
    `heading` section (a new file starts as `# Benchmarks`)."""
    print(section)
    if out is not None:
        text = out.read_text() if out.is_file() else "# Benchmarks\n"
        out.write_text(replace_section(text, section, heading))


def section_of(text: str, heading: str = HEADING) -> str:
    """The `heading` section of the Markdown `text` (up to the next `## `), or ''."""
    start = text.find(heading + "\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start : end + 1]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("base", type=Path, help="a `vqpix export` base folder")
    parser.add_argument("--version", type=int, default=None, help="default: the latest")
    parser.add_argument("--threads", type=int, default=4, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    parser.add_argument("--batch", type=int, default=8, help="largest VQ-VAE request")
    parser.add_argument("--repeats", type=int, default=3, help="runs per request size (cap)")
    parser.add_argument(
        "--rss-bound", type=float, default=64.0, help="MiB the load phase may add (else exit 1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--results", type=Path, default=None, help="a Markdown file to update")
    args = parser.parse_args(argv)
    for name in ("threads", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started, load_start = time.perf_counter(), " ".join(f"{v:.2f}" for v in os.getloadavg())
    from benchmarks.timing import machine

    exports = Exports(args.base, args.version)
    info = machine()
    print(f"[load] cap {exports.max_samples}: sample latency by size", flush=True)
    cap = measure_cap(exports, args.repeats)
    oversized = measure_oversized(exports)
    print(f"[load] {args.threads} clients for {args.seconds:g} s", flush=True)
    load = run_load(exports, args.threads, args.seconds, args.batch)
    results = {
        "command": "python -m benchmarks.load " + shlex.join(str(a) for a in argv),
        "minutes": (time.perf_counter() - started) / 60,
        "load_average": load_start,
        "machine": f"{info['CPU']}, {info['CPU count']}, TensorFlow {info['TensorFlow']}",
        "run": exports.run,
        "config": exports.config_name,
        "image_shape": "x".join(str(s) for s in exports.image_shape[:2]),
        "code_shape": "x".join(str(s) for s in exports.code_shape),
        "version": exports.version,
        "max_samples": exports.max_samples,
        "rss_bound_mib": args.rss_bound,
        "cap": cap,
        "oversized": oversized,
        "load": load,
    }
    text = report(results)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.results is not None:
        old = args.results.read_text() if args.results.exists() else ""
        args.results.write_text(replace_section(old, text))
    failures = []
    if load["errors"]:
        failures.append(f"{load['errors']} requests failed, e.g. {load['error_examples'][:2]}")
    if load["rss_growth_bytes"] > args.rss_bound * 2**20:
        failures.append(f"resident memory grew by {load['rss_growth_bytes'] / 2**20:.0f} MiB")
    if not all(row["refused"] for row in oversized):
        failures.append("an oversized request was not refused")
    for failure in failures:
        print(f"[load] FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
