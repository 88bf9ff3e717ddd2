"""`python -m benchmarks.attention [--every 5] [--repeats 5] [--out benchmarks/RESULTS.md]`: the cost of attention.

The default preset's prior against the same prior with causal self-attention after every
`--every`-th gated block (`prior.attention_every`; PixelSNAIL), random weights (the cost does
not depend on them), on the default 32x32 code maps, timed in alternation:

- one **training step** (`train_step` on a batch of the config's `batch_size` maps, compiled
  as `fit` runs it): attention compares every position with every earlier one, `(h w)^2`
  scores per map and head;
- one **forward pass** over `--samples` maps (graph mode);
- the **fast sampler** drawing `--samples` maps (`sample_codes_fast`): per position, the
  attention reads the keys and values of every earlier position from its cache, and *passes*
  is its time as a multiple of that prior's own forward pass.

(The reference sampler is left out: with attention it recomputes every earlier position for
each position, `(h w)^2 / 2` column steps per map; the tests check on small maps that it draws
the fast sampler's codes.) Prints a Markdown section and writes it into `--out` in place of its
previous version.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HEADING = "## Attention in the prior"


def measure(
    every: int,
    samples: int,
    repeats: int,
    code_size: int | None = None,
    num_layers: int | None = None,
) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.timing import alternate
    from keras_vqpix.config import get_config
    from keras_vqpix.models.pixelcnn import PixelCNN
    from keras_vqpix.sampling import resolve_labels, sample_codes_fast

    config = get_config("default")
    if num_layers is not None:  # a smaller prior (the smoke test)
        config = config.replace(**{"prior.num_layers": num_layers})
    size = code_size or config.code_size
    batch = config.prior.batch_size
    rng = np.random.default_rng(0)
    train_codes = rng.integers(0, config.vqvae.num_embeddings, (batch, size, size))
    data = (
        tf.constant(train_codes, tf.int32),
        tf.constant(rng.integers(0, 2, batch), tf.int32),
        tf.fill((batch, size, size), -1),
        tf.constant(rng.integers(0, config.prior.slice_positions, batch), tf.int32),
    )
    codes = tf.constant(train_codes[:samples], tf.int32)
    priors, steps, forwards, samplers = {}, {}, {}, {}
    for name, prior_config in (
        ("default", config.prior),
        ("attention", config.replace(**{"prior.attention_every": every}).prior),
    ):
        keras.utils.set_random_seed(0)
        prior = PixelCNN.from_run_config(
            prior_config, config.vqvae.num_embeddings, (size, size), seed=0
        )
        prior.compile(optimizer=keras.optimizers.Adam(1e-3))
        priors[name] = prior
        train_step = tf.function(prior.train_step)
        labels = resolve_labels(prior, samples)
        forward = tf.function(lambda c, lab, prior=prior: prior(c, lab, training=False))
        steps[name] = lambda step=train_step: step(data)["loss"].numpy()
        forwards[name] = lambda f=forward, lab=labels: f(codes, lab).numpy()
        samplers[name] = lambda p=prior, lab=labels: sample_codes_fast(p, samples, 0, lab)
        for warm_up in (steps[name], forwards[name], samplers[name]):
            warm_up()  # trace
    train = alternate(steps, repeats)
    passes = alternate(
        {
            f"{kind} {name}": fn
            for name in priors
            for kind, fn in (("forward", forwards[name]), ("fast", samplers[name]))
        },
        repeats,
    )
    return {
        "every": every,
        "code_size": size,
        "batch": batch,
        "samples": samples,
        "attention_layers": sum(a is not None for a in priors["attention"].attentions),
        "parameters": {name: prior.count_params() for name, prior in priors.items()},
        "train": train,
        "train_ratio": train["attention"].over(train["default"]),
        "forward": {name: passes[f"forward {name}"] for name in priors},
        "fast": {name: passes[f"fast {name}"] for name in priors},
        "fast_passes": {
            name: passes[f"fast {name}"].over(passes[f"forward {name}"]) for name in priors
        },
        "fast_ratio": passes["fast attention"].over(passes["fast default"]),
    }


def report(result: dict, command: str) -> str:
    from benchmarks.timing import load_average

    h, n = result["code_size"], result["samples"]
    rows = "".join(
        f"| {label} | {result['parameters'][name]:,} | {result['train'][name].show(3, 1e3)} "
        f"| {result['forward'][name].show(3, 1e3)} | {result['fast'][name].show(3)} "
        f"| {result['fast_passes'][name].show(3)} |\n"
        for name, label in (
            ("default", "default preset"),
            (
                "attention",
                f"with `attention_every={result['every']}` "
                f"({result['attention_layers']} attention layers)",
            ),
        )
    )
    return (
        f"{HEADING}\n\n"
        f"The default prior with and without causal self-attention ({h}x{h} code maps, random "
        f"weights), `{command}` (load average {load_average()}); timed in alternation:\n\n"
        f"| prior | parameters | training step, {result['batch']} maps (ms) "
        f"| forward pass, {n} maps (ms) | fast sampler, {n} maps (s) | fast (passes) |\n"
        "|---|---|---|---|---|---|\n"
        f"{rows}\n"
        f"Run by run, attention / default: training step {result['train_ratio'].show(3)} x, "
        f"fast sampler {result['fast_ratio'].show(3)} x.\n"
    )


def main(argv=None) -> int:
    from benchmarks.load import print_section

    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__)
    parser.add_argument("--every", type=int, default=5, help="prior.attention_every (default 5)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--code-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--layers", type=int, default=None, help="prior.num_layers (default 9)")
    parser.add_argument("--out", type=Path, default=None, help="a RESULTS.md to update")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.attention", *(argv or sys.argv[1:])])
    result = measure(args.every, args.samples, args.repeats, args.code_size, args.layers)
    print_section(report(result, command), HEADING, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
