"""Why full-image SSIM misleads on brain slices: the scores of trivial outputs on a data set.

    python tools/ssim_floors.py [--data DIR] [--image-size 128] [--split test]

Prints mean full-image and brain (foreground) SSIM of: an all-black output, the original with
the background zeroed (exact inside the head mask), and the bilinear down/up baselines by 4 and 8.
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow as tf

from keras_vqpix.data import discover_splits
from keras_vqpix.data.pipeline import make_dataset
from keras_vqpix.metrics import bilinear_baseline, head_mask, image_metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="ADNI-layout folder (default: the demo set)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--split", choices=["train", "validation", "test"], default="test")
    args = parser.parse_args()
    if args.data is None:
        from keras_vqpix.data.demo import ensure_demo_dataset

        args.data = ensure_demo_dataset()[0]
    records = getattr(discover_splits(args.data), args.split)
    candidates = {
        "all black": lambda x: tf.zeros_like(x),
        "exact inside the brain, black outside": lambda x: (
            x * tf.cast(head_mask(x)[..., None], x.dtype)
        ),
        "bilinear down/up by 4": lambda x: bilinear_baseline(x, 4),
        "bilinear down/up by 8": lambda x: bilinear_baseline(x, 8),
    }
    scores = {name: {"ssim": [], "ssim_foreground": []} for name in candidates}
    for images, _ in make_dataset(records, args.image_size, 32, cache=""):
        for name, make in candidates.items():
            metrics = image_metrics(images, make(images))
            for key in ("ssim", "ssim_foreground"):
                scores[name][key].append(metrics[key])
    print(f"{args.data} ({args.split}, {len(records)} slices, {args.image_size}x{args.image_size})")
    print(f"{'output':<40}{'SSIM':>8}{'brain SSIM':>12}")
    for name, values in scores.items():
        ssim = np.nanmean(np.concatenate(values["ssim"]))
        foreground = np.nanmean(np.concatenate(values["ssim_foreground"]))
        print(f"{name:<40}{ssim:>8.3f}{foreground:>12.3f}")


if __name__ == "__main__":
    main()
