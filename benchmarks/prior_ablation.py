"""`python -m benchmarks.prior_ablation RUN VARIANT --out DIR [--real REC]`: priors not in the config.

Issue 14's ablation rows that need more than a `config.json` edit, on the cached code maps of a
trained run RUN (its VQ-VAE; `RUN/codes/`, written by `vqpix train`):

- `layout`: a two-level prior (VQ-VAE-2's idea without a second VQ-VAE level). The top level is
  a coarse layout of each slice: the mean brightness of each 2x2 block of codes (each code's
  brightness: the mean of the decoded 4x4-pixel patches it takes in the training maps),
  quantized to 16 levels, a 16x16 map; a top `PixelCNN` over layouts (kept at its best
  validation epoch: it overfits the 1,280 training layouts within 10 epochs), and the code
  prior reading the whole layout (`PixelCNN(layout_levels=16, layout_upsample=2)`,
  `keras_vqpix.layers.layout_context`). Samples: a layout from the top prior, then the codes
  given it (`PixelCNNSteps(layout=)` with the fast sampler's row loop).
- `mirror`: the default prior trained on the training maps and the code maps of their
  left-right mirrored reconstructions (`keras_vqpix.codes.with_mirror_images`; twice the maps,
  half the epochs: the same steps), as the default config trains it through `vqpix train`, but
  with this script's batches.

Both priors have the run's prior architecture and recipe (width, blocks, cosine schedule,
batch 32, best validation bits per code) and its steps (800 on the default run: 20 epochs of
the maps alone, 10 of the maps and their mirror images). Writes `DIR/result.json` (test bits
per code, training seconds), `DIR/synthetic/` (`--per-class` slices per class, seed `--seed`,
in the ADNI layout of `vqpix generate`, with its acquisition noise unless `--no-noise`) and, with `--real` (e.g. the run's reconstructions,
`vqpix generate RUN --reconstruct DATA --out REC`), `DIR/compare.json` of `vqpix compare
DIR/synthetic --real REC`. Takes 30-40 minutes on 2 CPU cores with the default run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LAYOUT_CELLS = 16
LAYOUT_LEVELS = 16
TOP_EPOCHS = 40


def _fit(model, train, validation, epochs: int, prior_config, weights: Path) -> float:
    """Train `model` with the run's prior recipe; keep the best validation epoch. Seconds."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vqpix.training.schedule import learning_rate_schedule

    batch = prior_config.batch_size
    steps = int(np.ceil(len(train[0]) / batch))
    schedule = learning_rate_schedule(
        prior_config.learning_rate, prior_config.final_learning_rate_ratio, epochs * steps
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    batches = tf.data.Dataset.from_tensor_slices(train).shuffle(4096, seed=0).batch(batch)
    best = keras.callbacks.ModelCheckpoint(
        str(weights),
        monitor="val_bits_per_code",
        mode="min",
        save_best_only=True,
        save_weights_only=True,
    )
    started = time.time()
    model.fit(
        batches,
        validation_data=tf.data.Dataset.from_tensor_slices(validation).batch(64),
        epochs=epochs,
        callbacks=[best],
        verbose=2,
    )
    model.load_weights(weights)
    return time.time() - started


def code_brightness(vqvae, codes, num_embeddings: int):
    """Each code's brightness: the mean of the decoded patches it takes in `codes [N, h, w]`."""
    import numpy as np

    from keras_vqpix.sampling import decode_codes

    images = decode_codes(vqvae, codes)[..., 0]
    n, h, w = codes.shape
    factor = images.shape[1] // h
    patches = images.reshape(n, h, factor, w, factor).mean(axis=(2, 4))
    counts = np.bincount(codes.ravel(), minlength=num_embeddings)
    sums = np.bincount(codes.ravel(), weights=patches.ravel(), minlength=num_embeddings)
    return sums / np.maximum(counts, 1)


def layouts(brightness, codes, cells: int = LAYOUT_CELLS, levels: int = LAYOUT_LEVELS):
    """The `[N, cells, cells]` layout of code maps: mean brightness per block, `levels` levels."""
    import numpy as np

    n, h, w = codes.shape
    blocks = brightness[codes].reshape(n, cells, h // cells, cells, w // cells).mean(axis=(2, 4))
    return np.minimum(np.floor(blocks * levels), levels - 1).astype(np.int32)


def run(
    run_dir: Path, variant: str, out: Path, per_class: int, seed: int, real, *, noise: bool = True
) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vqpix.codes import with_mirror_images
    from keras_vqpix.models.pixelcnn import PixelCNN, bits_per_code
    from keras_vqpix.models.pixelcnn_steps import PixelCNNSteps
    from keras_vqpix.noise import add_noise
    from keras_vqpix.run_folder import RunPaths, load_vqvae
    from keras_vqpix.sampling import (
        SAMPLE_BATCH_SIZE,
        decode_codes,
        sample_codes,
        sample_rows_fast,
    )
    from keras_vqpix.synthetic import run_frame, run_noise_levels, to_frame_float, to_pixels

    vqvae, config, _ = load_vqvae(run_dir)
    files = {s: RunPaths(run_dir).codes / f"{s}.npz" for s in ("train", "validation", "test")}
    for path in files.values():
        if not path.is_file():
            raise SystemExit(f"{path} is missing: train the run's prior stage first (vqpix train)")
    cached = {s: np.load(path) for s, path in files.items()}
    codes = {s: cached[s]["codes"].astype(np.int32) for s in cached}
    labels = {s: cached[s]["labels"].astype(np.int32) for s in cached}
    size, num_embeddings = codes["train"].shape[1], config.vqvae.num_embeddings
    prior_config = config.prior

    def new_prior(**kwargs):
        keras.utils.set_random_seed(config.seed)
        arguments = prior_config.model_arguments() | kwargs
        return PixelCNN(num_embeddings=arguments.pop("num_embeddings", num_embeddings), **arguments)

    # The run's steps as epochs over the training maps alone (a mirrored run's epochs cover
    # twice the maps), so every variant trains for the same steps whatever the run's recipe.
    plain_epochs = prior_config.epochs * (2 if prior_config.mirror else 1)
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run_dir), "variant": variant}
    draw_labels = np.repeat(np.array([0, 1], np.int32), per_class)
    if variant == "mirror":
        train = with_mirror_images(vqvae, codes["train"], labels["train"])[:2]
        prior = new_prior(code_shape=(size, size), seed=config.seed)
        prior(tf.zeros((1, size, size), tf.int32), tf.zeros((1,), tf.int32))
        result["seconds"] = _fit(
            prior,
            train,
            (codes["validation"], labels["validation"]),
            max(plain_epochs // 2, 1),
            prior_config,
            out / "prior.weights.h5",
        )
        result["test_bits_per_code"] = bits_per_code(prior, codes["test"], labels["test"])
        drawn = sample_codes(prior, len(draw_labels), seed=seed, labels=draw_labels)
    elif variant == "layout":
        brightness = code_brightness(vqvae, codes["train"], num_embeddings)
        layout = {s: layouts(brightness, codes[s]) for s in codes}
        top = new_prior(
            num_embeddings=LAYOUT_LEVELS, code_shape=(LAYOUT_CELLS,) * 2, seed=config.seed
        )
        top(tf.zeros((1, LAYOUT_CELLS, LAYOUT_CELLS), tf.int32), tf.zeros((1,), tf.int32))
        top_seconds = _fit(
            top,
            (layout["train"], labels["train"]),
            (layout["validation"], labels["validation"]),
            TOP_EPOCHS,
            prior_config,
            out / "top.weights.h5",
        )
        prior = new_prior(
            code_shape=(size, size),
            seed=config.seed,
            layout_levels=LAYOUT_LEVELS,
            layout_upsample=size // LAYOUT_CELLS,
        )
        prior(
            tf.zeros((1, size, size), tf.int32),
            tf.zeros((1,), tf.int32),
            layout=tf.zeros((1, LAYOUT_CELLS, LAYOUT_CELLS), tf.int32),
        )
        bottom_seconds = _fit(
            prior,
            (codes["train"], labels["train"], layout["train"]),
            (codes["validation"], labels["validation"], layout["validation"]),
            plain_epochs,
            prior_config,
            out / "prior.weights.h5",
        )
        test = tf.data.Dataset.from_tensor_slices(
            (codes["test"], labels["test"], layout["test"])
        ).batch(64)
        bottom_bits = prior.evaluate(test, return_dict=True, verbose=0)["bits_per_code"]
        top_bits = bits_per_code(top, layout["test"], labels["test"])
        # -log2 p(codes) <= -log2 p(layout) - log2 p(codes | layout), per code.
        result |= {
            "seconds": top_seconds + bottom_seconds,
            "top_seconds": top_seconds,
            "top_test_bits_per_cell": top_bits,
            "test_bits_per_code_given_layout": bottom_bits,
            "test_bits_per_code": bottom_bits + top_bits * LAYOUT_CELLS**2 / size**2,
        }
        drawn_layouts = sample_codes(top, len(draw_labels), seed=seed, labels=draw_labels)

        @tf.function(autograph=False)
        def draw(layout_batch, label_batch, first_map):
            steps = PixelCNNSteps(prior, label_batch, size, layout=layout_batch)
            blank = tf.zeros((tf.shape(label_batch)[0], size, size), tf.int32)
            # A seed of its own for the code level (the top level drew with `seed`).
            return sample_rows_fast(steps, blank, steps.start(), seed + 1, 1.0, 0, size, first_map)[
                0
            ]

        drawn = np.concatenate(
            [
                draw(
                    tf.constant(drawn_layouts[i : i + SAMPLE_BATCH_SIZE]),
                    tf.constant(draw_labels[i : i + SAMPLE_BATCH_SIZE]),
                    tf.constant(i),
                ).numpy()
                for i in range(0, len(draw_labels), SAMPLE_BATCH_SIZE)
            ]
        )
    else:
        raise ValueError(f"VARIANT must be 'layout' or 'mirror'. Received: {variant!r}")
    slices = to_frame_float(decode_codes(vqvae, drawn), run_frame(run_dir))
    if noise:  # as `vqpix generate` draws it: each slice its own patient
        brain, background = run_noise_levels(run_dir).draw(draw_labels, seed)
        slices = add_noise(slices, brain, background, seed)
    _write_dataset(out / "synthetic", to_pixels(slices), draw_labels, per_class, seed)
    if real is not None:
        from keras_vqpix.compare import compare_datasets

        figures = compare_datasets(out / "synthetic", real, log=print).metrics
        (out / "compare.json").write_text(json.dumps(figures, indent=2, sort_keys=True))
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def _write_dataset(root: Path, slices, labels, per_class: int, seed: int) -> None:
    """The slices as `vqpix generate` names them: the last 20% of each class in `test/`."""
    from PIL import Image

    from keras_vqpix.data.discover import CLASS_NAMES
    from keras_vqpix.synthetic import JPEG_QUALITY

    test_from = per_class - round(0.2 * per_class)
    for index, (label, pixels) in enumerate(zip(labels, slices, strict=True)):
        number = index % per_class
        name = CLASS_NAMES[label]
        folder = root / ("test" if number >= test_from else "train") / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(
            folder / f"syn{seed}-{name}-{number:05d}_0.jpeg", quality=JPEG_QUALITY
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained run folder (its VQ-VAE and codes)")
    parser.add_argument("variant", choices=("layout", "mirror"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--real", type=Path, default=None, help="judge the samples against it")
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-noise",
        dest="noise",
        action="store_false",
        help="write the decoder's noise-free means (as `vqpix generate --no-noise`)",
    )
    args = parser.parse_args(argv)
    result = run(
        args.run, args.variant, args.out, args.per_class, args.seed, args.real, noise=args.noise
    )
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
