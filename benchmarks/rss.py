"""Peak resident memory of VQ-VAE training, in a process of its own.

`python -m benchmarks.rss --config default --steps 20 --data DIR` builds the config's VQ-VAE
and training pipeline (decoded images cached in memory, shuffle buffer) as `vqpix train`
does, fits `--steps` steps, and prints one JSON line with the process's peak RSS
(`ru_maxrss`). The shuffle buffer holds a whole epoch of the demo data, so the first step
already decodes and caches every training slice: a few steps show the steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss", description=__doc__)
    parser.add_argument("--config", default="default", choices=("quick", "default"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()

    from keras_vqpix.config import get_config
    from keras_vqpix.data.discover import discover_splits
    from keras_vqpix.data.pipeline import steps_per_epoch
    from keras_vqpix.training.vqvae_training import build_vqvae, training_dataset

    config = get_config(args.config)
    data = config.data
    splits = discover_splits(args.data, data.validation_fraction, config.seed)
    model = build_vqvae(config, steps_per_epoch(len(splits.train), data.batch_size))
    dataset = training_dataset(splits.train, config)
    model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0)
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    print(
        json.dumps(
            {
                "config": args.config,
                "steps": args.steps,
                "batch_size": data.batch_size,
                "image_size": data.image_size,
                "train_images": len(splits.train),
                "peak_rss_bytes": peak,
                "seconds": time.perf_counter() - started,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
