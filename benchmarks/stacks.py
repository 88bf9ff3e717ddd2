"""`python -m benchmarks.stacks [--repeats 5] [--out benchmarks/RESULTS.md]`: synthetic patients.

Times drawing one synthetic patient (a stack of `--slices` 32x32 code maps) from a prior of the
`patients` preset (random weights: the cost does not depend on them), two ways, in alternation:

- **wavefront** (`sample_stacks`, the default): every slice at once, slice z one row behind
  slice z - 1; and the same with classifier-free guidance (`guidance=2`, the recipe of the
  synthetic patients docs: each map run twice);
- **slice after slice**: `sample_codes` with the fast per-slice sampler, once per slice, each
  given the previous slice (what the wavefront replaces; the same codes);
- **first slice from a per-slice prior** (`--first-slices`): the default preset's prior draws
  slice 0, the wavefront the others.

and, once, 16 patients at once (throughput). Prints a Markdown section and writes it into
`--out` in place of its previous version (the other sections are kept).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HEADING = "## Synthetic patients"
GUIDANCE = 2.0  # the guided patients recipe of docs/synthetic.md


def measure(
    slices: int, repeats: int, code_size: int | None = None, num_layers: int | None = None
) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.timing import alternate, timed
    from keras_vqpix.config import get_config
    from keras_vqpix.data.stacks import position_bins
    from keras_vqpix.models.pixelcnn import PixelCNN
    from keras_vqpix.sampling import sample_codes, sample_stacks, slice_seed

    config, first_config = get_config("patients"), get_config("default")
    if num_layers is not None:  # smaller priors (the smoke test)
        config = config.replace(**{"prior.num_layers": num_layers})
        first_config = first_config.replace(**{"prior.num_layers": num_layers})
    keras.utils.set_random_seed(0)
    size = code_size or config.code_size

    def built(prior_config):
        model = PixelCNN.from_run_config(prior_config, config.vqvae.num_embeddings, (size, size), 0)
        model(tf.zeros((1, size, size), tf.int32), tf.zeros((1,), tf.int32))
        return model

    prior = built(config.prior)
    bins = position_bins(slices, prior.slice_positions)
    first_prior = built(first_config.prior)

    def wavefront():
        return sample_stacks(prior, 1, slices, seed=1, labels=1)

    def guided():
        return sample_stacks(prior, 1, slices, seed=1, labels=1, guidance=GUIDANCE)

    def slice_after_slice():
        previous, stack = None, []
        for z in range(slices):
            previous = sample_codes(
                prior,
                1,
                int(slice_seed(1, z)),
                1,
                previous=previous,
                positions=int(bins[z]),
            )
            stack.append(previous)
        return np.stack(stack, axis=1)

    def first_slice_apart():
        return sample_stacks(prior, 1, slices, seed=1, labels=1, first_prior=first_prior)

    same = np.array_equal(wavefront(), slice_after_slice())  # also the warm-up (tracing)
    first_slice_apart()
    guided()
    times = alternate(
        {
            "wavefront": wavefront,
            "guided": guided,
            "slices": slice_after_slice,
            "first": first_slice_apart,
        },
        repeats,
    )
    batch_seconds, _ = timed(lambda: sample_stacks(prior, 16, slices, seed=2))
    return {
        "slices": slices,
        "code_size": size,
        "num_layers": num_layers,
        "same_codes": bool(same),
        "wavefront": times["wavefront"],
        "guided_time": times["guided"],
        "slices_time": times["slices"],
        "first_time": times["first"],
        "speedup": times["slices"].over(times["wavefront"]),
        "batch_16_seconds": batch_seconds,
    }


def report(result: dict, command: str) -> str:
    from benchmarks.timing import load_average

    s, h = result["slices"], result["code_size"]
    layers = result["num_layers"]
    smaller = "" if layers is None else f" with `num_layers={layers}`"
    return (
        f"{HEADING}\n\n"
        f"One synthetic patient of {s} slices ({h}x{h} code maps, the `patients` preset's "
        f"prior{smaller}, random weights), `{command}` (load average {load_average()}):\n\n"
        "| method | seconds per patient | row steps |\n|---|---|---|\n"
        f"| wavefront (`sample_stacks`, default) | {result['wavefront'].show(2)} | {h + s - 1} |\n"
        f"| wavefront with `guidance={GUIDANCE:g}` (each map run twice) "
        f"| {result['guided_time'].show(2)} | {h + s - 1} |\n"
        f"| slice after slice (fast per-slice sampler) | {result['slices_time'].show(2)} "
        f"| {s * h} |\n"
        f"| wavefront, slice 0 from the default preset's prior (`--first-slices`) "
        f"| {result['first_time'].show(2)} | {h} + {h + s - 2} |\n\n"
        f"Speed-up of the wavefront, run by run: {result['speedup'].show(2)} x; the same codes: "
        f"{'yes' if result['same_codes'] else 'NO'}. 16 patients at once: "
        f"{result['batch_16_seconds']:.1f} s ({result['batch_16_seconds'] / 16:.2f} s each).\n"
    )


def main(argv=None) -> int:
    from benchmarks.load import print_section

    parser = argparse.ArgumentParser(prog="python -m benchmarks.stacks", description=__doc__)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--code-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--layers", type=int, default=None, help="prior.num_layers (default 9)")
    parser.add_argument("--out", type=Path, default=None, help="a RESULTS.md to update")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.stacks", *(argv or sys.argv[1:])])
    print_section(
        report(measure(args.slices, args.repeats, args.code_size, args.layers), command),
        HEADING,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
