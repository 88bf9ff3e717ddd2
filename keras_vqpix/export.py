"""Versioned SavedModels of a run for TensorFlow Serving: the VQ-VAE and the sampling generator.

```
BASE/models.config                    TF Serving `model_config_list` naming both models
BASE/vqvae/<version>/                 serving_default: images -> reconstruction, codes
                                      encode: images -> codes;  decode: codes -> images
BASE/vqpix_generator/<version>/       sample (= serving_default): num_samples, seed,
                                      temperature, label -> images, codes (and noisy_images:
                                      with acquisition noise, levels in noise_square.json)
each version also holds config.json (the run's), vqvae.json (and prior.json), README, and
assets.extra/tf_serving_warmup_requests (one small request per signature)
```

How it is written: each version is built in a hidden temporary folder inside its model's folder
(a name starting with a dot, not an integer, which TF Serving does not take for a version) and
renamed to its number only when complete; both models of one export share the number (the
next free one over both folders, or `version`) and are renamed together at the end, so a
failure leaves neither a half-written version nor a temporary folder (a SIGKILL leaves the
hidden folder, which TF Serving ignores and the next export removes). An existing version is
never overwritten. Exports into one base take turns (a lock file, `BASE/.export.lock`), so
concurrent ones never pick the same number. A run without a prior yet exports the VQ-VAE
alone (and says so through `on_note`); a prior trained on another VQ-VAE is refused.

Keras 3's `keras.export.ExportArchive` writes both models, not `tf.saved_model.save`: every
signature is an `add_endpoint` with an explicit `input_signature` (named, typed inputs for TF
Serving), the archive saves the variables of the models it tracks (the generator tracks the
prior, the quantizer and the decoder, not the encoder), and the first endpoint doubles as
`serving_default`. `add_endpoint` traces without autograph, which is no obstacle: the sampler
is written with an explicit `tf.while_loop` (`keras_vqpix.sampling.codes_graph`), so
hand-made `tf.function` signatures would bring nothing. The graphs hold only core TensorFlow
ops, and every weight (the PixelCNN masks included) is a variable, not a constant folded into
the graph, so `saved_model.pb` stays small and loading an export needs TensorFlow alone, no
Python code of this package (the tests load the exports in a process that never imports it,
and through the C API that TF Serving's loader uses).

Inputs are checked inside the graph, with messages naming the input: dtypes by the signatures;
shapes by a `tf.ensure_shape` first (a signature loaded by `tf.saved_model.load` does not
check the shapes it is fed); then `images` in [0, 1], `codes` in [0, K), `num_samples` in
1 .. the export's cap (`max_samples`), `temperature` a normal float32 > 0, and `label` in
{-1 (unconditional), 0 (NC), 1 (AD)} for a conditional prior but exactly -1 for an unconditional one (as
`keras_vqpix.sampling.resolve_labels`: a class label given to a prior that cannot honour it is
an error, not silently ignored).

Bounded work per request: four scalars must not buy unbounded work, so the generator refuses
`num_samples` above the cap baked in at export (`vqpix export --max-samples`, recorded in the
version's README and in the `serving` section of its config.json). The check runs before the
sampler allocates anything (every tensor the sampler makes depends on the checked
`num_samples`), so an oversized request costs a few microseconds and no memory. A client
wanting more samples sends several requests with different seeds.

Warm-up: a signature's first call builds its graph (about 2 s for the patients preset's
`sample_patient`, against milliseconds for a refusal once built). Each version holds TF
Serving's warm-up file (`assets.extra/tf_serving_warmup_requests`, `PredictionLog` records,
https://www.tensorflow.org/tfx/serving/saved_model_warmup): one small good request per
signature, which the server replays when it loads the version, before it takes traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vqpix.config import SERVING_MAX_SAMPLES, SERVING_MAX_SLICES
from keras_vqpix.io import atomic_directory, atomic_write_text
from keras_vqpix.noise import BRAIN_LEVEL, NoiseLevels
from keras_vqpix.run_folder import RunPaths, load_prior, load_vqvae, read_config
from keras_vqpix.sampling import (
    DEFAULT_METHOD,
    TEMPERATURE_RANGE,
    UNCONDITIONAL,
    codes_graph,
    sampler,
    stacks_graph,
)

VQVAE_NAME = "vqvae"
GENERATOR_NAME = "vqpix_generator"
MODELS_CONFIG = "models.config"


# -- Signatures -------------------------------------------------------------------------------------
def _checked_shape(value, spec: tf.TensorSpec):
    """`value` with its runtime shape checked against `spec`.

    A signature loaded by `tf.saved_model.load` checks the dtypes it is fed but not the shapes:
    without this a tensor of the wrong rank fails deep inside the graph with an obscure message.
    """
    return tf.ensure_shape(value, spec.shape, name=f"check_{spec.name}_shape")


def _checked_images(images, spec: tf.TensorSpec):
    """`images` checked for its shape and for values in [0, 1] (NaN fails too)."""
    images = _checked_shape(images, spec)
    in_range = tf.reduce_all(tf.logical_and(images >= 0.0, images <= 1.0))
    message = "images must be float32 in [0, 1] (scale 8-bit pixels by 1/255)"
    with tf.control_dependencies([tf.debugging.Assert(in_range, [message])]):
        return tf.identity(images)


def _checked_codes(codes, spec: tf.TensorSpec, num_embeddings: int):
    """`codes` checked for its shape and for values in [0, K)."""
    codes = _checked_shape(codes, spec)
    in_range = tf.reduce_all(tf.logical_and(codes >= 0, codes < num_embeddings))
    message = f"codes must be in [0, {num_embeddings}) (the VQ-VAE's codebook size)"
    with tf.control_dependencies([tf.debugging.Assert(in_range, [message])]):
        return tf.identity(codes)


def _checked_sample_inputs(
    prior,
    specs,
    max_samples,
    num_samples,
    seed,
    temperature,
    label,
    *,
    count_name: str = "num_samples",
    cap_option: str = "--max-samples",
):
    """The inputs of `sample` (or `sample_patient`: `count_name` num_slices), each checked
    for its shape (scalar) and its range.

    `num_samples` above `max_samples` is refused here, before the sampler allocates anything.
    """
    num_samples, seed, temperature, label = (
        _checked_shape(value, spec)
        for value, spec in zip((num_samples, seed, temperature, label), specs, strict=True)
    )
    if not prior.conditional:
        label_ok = tf.equal(label, UNCONDITIONAL)
        label_message = (
            "label must be -1: this prior is unconditional (trained without labels). Received:"
        )
    else:
        label_ok = tf.logical_and(label >= UNCONDITIONAL, label < prior.num_classes)
        classes = "0 (NC) or 1 (AD)" if prior.num_classes == 2 else f"0 .. {prior.num_classes - 1}"
        label_message = f"label must be -1 (unconditional), {classes}. Received:"
    checks = [
        tf.debugging.Assert(
            num_samples >= 1, [f"{count_name} must be >= 1. Received:", num_samples]
        ),
        tf.debugging.Assert(
            num_samples <= max_samples,
            [
                f"{count_name} must be <= {max_samples}, the cap per request of this export "
                f"(vqpix export {cap_option}); send several requests with other seeds. Received:",
                num_samples,
            ],
        ),
        tf.debugging.Assert(
            tf.logical_and(temperature >= TEMPERATURE_RANGE[0], tf.math.is_finite(temperature)),
            [
                f"temperature must be a finite number > 0 (a normal float32, >= "
                f"{TEMPERATURE_RANGE[0]:.3g}). Received:",
                temperature,
            ],
        ),
        tf.debugging.Assert(label_ok, [label_message, label]),
    ]
    with tf.control_dependencies(checks):
        return tuple(tf.identity(v) for v in (num_samples, seed, temperature, label))


def _unless_empty(batch, run, empty: dict) -> dict:
    """`run(batch)`, or the `empty` outputs (tensors of zero rows) when `batch` has no rows.

    No model runs on an empty batch: TensorFlow's oneDNN `Conv2D` returns the input's shape for
    one (`keras_vqpix.data.pipeline.batch_sizes` has the reproduction), so a request of zero
    images or code maps would fail, or answer with wrongly shaped tensors.
    """
    return tf.cond(tf.shape(batch)[0] > 0, lambda: run(batch), lambda: empty)


def vqvae_archive(vqvae, image_shape: tuple[int, int]):
    """A `keras.export.ExportArchive` of the VQ-VAE: `serving_default`, `encode`, `decode`."""
    import keras

    height, width = image_shape
    factor = vqvae.downsample_factor
    code_height, code_width = height // factor, width // factor
    images_spec = tf.TensorSpec([None, height, width, 1], tf.float32, name="images")
    codes_spec = tf.TensorSpec([None, code_height, code_width], tf.int32, name="codes")

    no_images = tf.zeros([0, height, width, 1], tf.float32)
    no_codes = tf.zeros([0, code_height, code_width], tf.int32)

    def reconstruct(images):
        def run(images):
            outputs = vqvae(images, training=False)
            return {"reconstruction": outputs["reconstruction"], "codes": outputs["codes"]}

        empty = {"reconstruction": no_images, "codes": no_codes}
        return _unless_empty(_checked_images(images, images_spec), run, empty)

    def encode(images):
        def run(images):
            return {"codes": vqvae.encode(images)}

        return _unless_empty(_checked_images(images, images_spec), run, {"codes": no_codes})

    def decode(codes):
        def run(codes):
            return {"images": vqvae.decode(codes)}

        codes = _checked_codes(codes, codes_spec, vqvae.num_embeddings)
        return _unless_empty(codes, run, {"images": no_images})

    archive = keras.export.ExportArchive()
    archive.track(vqvae)
    archive.add_endpoint("serving_default", reconstruct, input_signature=[images_spec])
    archive.add_endpoint("encode", encode, input_signature=[images_spec])
    archive.add_endpoint("decode", decode, input_signature=[codes_spec])
    return archive


# Second components of the stateless seeds of the noise (the request's seed is the first), apart
# from the sampler's.
_NOISE_LEVEL_STREAM = 0x4E4F4931
_NOISE_DRAW_STREAM = 0x4E4F4932


def acquisition_noise_graph(levels: NoiseLevels):
    """`noise(images, labels, seed)`: `keras_vqpix.noise.add_noise` in the graph.

    `images` `[n, H, W, 1]` in [0, 1]; `labels` `[n]` (0 NC, 1 AD, -1 any class), or `[1]` (one
    level for all n images: one patient); `seed` the request's int32 seed. Each image (or the
    one patient) gets the (brain, background) pair of a training slice of its class,
    drawn with a stateless seed, and Rician noise of that level: the same model as
    `add_noise`, another random stream (TF's stateless draws, not NumPy's).
    """
    pools = [levels.pool(label) for label in (0, 1, UNCONDITIONAL)]  # rows 0, 1, 2
    table = np.zeros((3, max(len(p) for p in pools)), np.int32)
    for row, pool in enumerate(pools):
        table[row, : len(pool)] = pool
    table = tf.constant(table)
    counts = tf.constant([len(p) for p in pools], tf.int32)
    brain = tf.constant(np.asarray(levels.brain, np.float32))
    background = tf.constant(np.asarray(levels.background, np.float32))

    def noise(images, labels, seed):
        row = tf.where(labels < 0, 2, labels)
        count = tf.gather(counts, row)
        draw = tf.random.stateless_uniform(
            tf.shape(row), tf.stack([seed, _NOISE_LEVEL_STREAM]), dtype=tf.float32
        )
        pick = tf.minimum(tf.cast(draw * tf.cast(count, tf.float32), tf.int32), count - 1)
        index = tf.gather_nd(table, tf.stack([row, pick], axis=1))
        level_brain = tf.gather(brain, index)[:, None, None, None]
        level_background = tf.gather(background, index)[:, None, None, None]
        share = tf.clip_by_value(images / BRAIN_LEVEL, 0.0, 1.0)
        sigma = level_background + (level_brain - level_background) * share
        parts = tf.random.stateless_normal(
            tf.concat([[2], tf.shape(images)], axis=0), tf.stack([seed, _NOISE_DRAW_STREAM])
        )
        noisy = tf.sqrt(tf.square(images + sigma * parts[0]) + tf.square(sigma * parts[1]))
        return tf.clip_by_value(noisy, 0.0, 1.0)

    return noise


def generator_archive(
    vqvae,
    prior,
    code_shape: tuple[int, int],
    method: str = DEFAULT_METHOD,
    max_samples: int = SERVING_MAX_SAMPLES,
    max_slices: int = SERVING_MAX_SLICES,
    noise_levels: NoiseLevels | None = None,
):
    """A `keras.export.ExportArchive` of the generator: `sample` (also `serving_default`), and
    `sample_patient` for a prior that reads the previous slice.

    The whole ancestral sampling loop runs inside the graph (`codes_graph` with `method`, a key
    of `keras_vqpix.sampling.SAMPLERS`; all draw the same codes), then the VQ-VAE's decoder
    turns the codes into images. `max_samples`: int >= 1, the cap on `num_samples` per
    request, baked into the graph. `sample_patient` draws one whole patient, a stack of
    `num_slices` consecutive slices (`keras_vqpix.sampling.stacks_graph`: the stack of
    `sample_stacks` for the same seed, label and temperature), `num_slices` capped by
    `max_slices`. With `noise_levels` (fitted at the model's resolution,
    `keras_vqpix.synthetic.run_noise_levels(square=True)`) both also return `noisy_images`:
    the images with acquisition noise drawn in the graph (`acquisition_noise_graph`), one
    level per sample (per patient for `sample_patient`) from the training slices of its class.
    """
    sampler(method)  # an unknown method is refused here, not when the graph is traced
    import keras

    max_samples = check_max_samples(max_samples)
    max_slices = check_max_samples(max_slices, "--max-slices")
    code_height, code_width = code_shape
    noise = None if noise_levels is None else acquisition_noise_graph(noise_levels)
    specs = [
        tf.TensorSpec([], tf.int32, name="num_samples"),
        tf.TensorSpec([], tf.int32, name="seed"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="label"),
    ]

    def sample(num_samples, seed, temperature, label):
        num_samples, seed, temperature, label = _checked_sample_inputs(
            prior, specs, max_samples, num_samples, seed, temperature, label
        )
        labels = tf.fill(tf.reshape(num_samples, [1]), label)
        codes = codes_graph(
            prior, num_samples, seed, labels, temperature, code_height, code_width, method=method
        )
        images = vqvae.decode(codes)
        if noise is None:
            return {"images": images, "codes": codes}
        return {"images": images, "codes": codes, "noisy_images": noise(images, labels, seed)}

    archive = keras.export.ExportArchive()
    # The decoder's side of the VQ-VAE only: the encoder's weights have no use here.
    for model in (prior, vqvae.quantizer, vqvae.decoder):
        archive.track(model)
    archive.add_endpoint("sample", sample, input_signature=specs)
    # The first endpoint is also written as `serving_default`.
    if getattr(prior, "previous_slice", False):
        patient_specs = [
            tf.TensorSpec([], tf.int32, name="num_slices"),
            *specs[1:],
        ]

        def sample_patient(num_slices, seed, temperature, label):
            # The checks of `sample`, with num_slices in the place of num_samples.
            num_slices, seed, temperature, label = _checked_sample_inputs(
                prior,
                patient_specs,
                max_slices,
                num_slices,
                seed,
                temperature,
                label,
                count_name="num_slices",
                cap_option="--max-slices",
            )
            codes = stacks_graph(
                prior, 1, num_slices, seed, label, temperature, code_height, code_width, method
            )[0]
            images = vqvae.decode(codes)
            if noise is None:
                return {"images": images, "codes": codes}
            # One patient: one level for all its slices.
            noisy = noise(images, tf.reshape(label, [1]), seed)
            return {"images": images, "codes": codes, "noisy_images": noisy}

        archive.add_endpoint("sample_patient", sample_patient, input_signature=patient_specs)
    return archive


def check_max_samples(max_samples, option: str = "--max-samples") -> int:
    """`max_samples` as an int in 1 .. 2**31 - 1 (an int32, as `num_samples`), or a ValueError
    naming `option`."""
    if (
        isinstance(max_samples, bool)
        or not isinstance(max_samples, int)
        or not 1 <= max_samples < 2**31
    ):
        raise ValueError(
            f"{option} must be an integer in 1 .. 2**31 - 1. Received: {max_samples!r}"
        )
    return max_samples


# -- Versions and models.config ---------------------------------------------------------------------
def existing_versions(model_dir: Path) -> list[int]:
    """The version numbers TF Serving would see in `model_dir`: its integer-named folders."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def choose_version(model_dirs: list[Path], version: int | None = None) -> int:
    """`version`, refused when any of `model_dirs` has it; by default the next free number.

    The next free number is one more than the largest version of all the folders, so the models
    of one export share their number.
    """
    taken = sorted({v for folder in model_dirs for v in existing_versions(folder)})
    next_free = (taken[-1] if taken else 0) + 1
    if version is None:
        return next_free
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"--version must be an integer >= 1. Received: {version!r}")
    for folder in model_dirs:
        if (folder / str(version)).exists():
            raise FileExistsError(
                f"--version {version}: {folder / str(version)} already exists and versions are never "
                f"overwritten; omit --version for the next free one ({next_free})"
            )
    return version


def read_models_config(path: Path):
    """The TF Serving config file `path` as a `ModelServerConfig` proto (empty when absent).

    Parsed with TF Serving's own proto, so what passes here is what
    `tensorflow_model_server --model_config_file` accepts.

    Raises:
        ValueError: the file is not a `model_config_list` in the proto's text format.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except (text_format.ParseError, UnicodeDecodeError) as error:
            message = " ".join(str(error).split())
            raise ValueError(
                f"{path} is not a TF Serving model config ({message}); fix or remove it"
            ) from error
        if config.WhichOneof("config") == "custom_model_config":
            raise ValueError(f"{path} holds a custom_model_config, not a model_config_list")
    return config


def update_models_config(path: Path, models: dict[str, str]) -> None:
    """Add or update `models` (name -> base_path) in the TF Serving config file `path`.

    Written with TF Serving's `ModelServerConfig` proto, atomically. Other models already
    listed are kept, and so are the other fields of ours (e.g. a `model_version_policy` added
    by hand); only `base_path` and `model_platform` are set.
    """
    from google.protobuf import text_format

    config = read_models_config(path)
    entries = config.model_config_list.config
    for name, base_path in models.items():
        entry = next((e for e in entries if e.name == name), None) or entries.add(name=name)
        entry.base_path = base_path
        entry.model_platform = "tensorflow"
    atomic_write_text(path, text_format.MessageToString(config))


def _serving_base_path(serving_base_path) -> str | None:
    if serving_base_path is None:
        return None
    text = str(serving_base_path)
    if not posixpath.isabs(text):
        raise ValueError(
            f"--serving-base-path must be an absolute path (as the server sees it). Received: {text!r}"
        )
    return posixpath.normpath(text)


# -- The files beside each SavedModel ---------------------------------------------------------------
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


def write_warmup_requests(folder: Path, model_name: str, requests: dict[str, dict]) -> Path:
    """TF Serving's warm-up file of a version `folder`: one `PredictionLog` per signature.

    `requests`: signature name -> its inputs (name -> NumPy value). The server replays them
    when it loads the version, so no client request pays for building a signature's graph.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = folder / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests.items():
            spec = model_pb2.ModelSpec(name=model_name, signature_name=signature)
            request = predict_pb2.PredictRequest(model_spec=spec)
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictLog(request=request)
            writer.write(prediction_log_pb2.PredictionLog(predict_log=log).SerializeToString())
    return path


def _vqvae_warmup(image_shape, code_shape) -> dict[str, dict]:
    images = {"images": np.zeros((1, *image_shape, 1), np.float32)}
    codes = {"codes": np.zeros((1, *code_shape), np.int32)}
    return {"serving_default": images, "encode": images, "decode": codes}


def _generator_warmup(prior, max_slices: int) -> dict[str, dict]:
    label = 0 if prior.conditional else UNCONDITIONAL
    scalars = {"seed": np.int32(0), "temperature": np.float32(1.0), "label": np.int32(label)}
    sample = {"num_samples": np.int32(1), **scalars}
    requests = {"sample": sample, "serving_default": sample}
    if getattr(prior, "previous_slice", False):
        # Two slices: a slice with a previous one, the wavefront's whole graph.
        requests["sample_patient"] = {"num_slices": np.int32(min(2, max_slices)), **scalars}
    return requests


def _write_file(path: Path, text: str) -> None:
    """Write one file of a version (a function of its own so tests can interrupt an export)."""
    path.write_text(text)


_VQVAE_README = """\
{name}, version {version}: the VQ-VAE of the run {run}.
SavedModel (tag "serve") written by keras_vqpix {package_version} with TensorFlow {tf_version}.

Signatures:
  serving_default  images float32 [n, {height}, {width}, 1] in [0, 1]
                   -> reconstruction float32 [n, {height}, {width}, 1], codes int32 [n, {h}, {w}]
  encode           images float32 [n, {height}, {width}, 1] in [0, 1] -> codes int32 [n, {h}, {w}]
  decode           codes int32 [n, {h}, {w}] in [0, {k}) -> images float32 [n, {height}, {width}, 1]

VQ-VAE fingerprint: {vqvae_fingerprint} (epoch {vqvae_epoch}; see vqvae.json)
Run config: config.json
Warm-up: assets.extra/tf_serving_warmup_requests (one request per signature, replayed by TF
Serving when it loads this version)
"""

_GENERATOR_README = """\
{name}, version {version}: the PixelCNN prior and VQ-VAE decoder of the run {run}.
SavedModel (tag "serve") written by keras_vqpix {package_version} with TensorFlow {tf_version}.

Signatures (serving_default is the same as sample):
  sample  num_samples int32 scalar, 1 .. {max_samples} (this export's cap per request),
          seed int32 scalar, temperature float32 scalar > 0, label int32 scalar ({labels})
          -> images float32 [num_samples, {height}, {width}, 1] in [0, 1],
             codes int32 [num_samples, {h}, {w}]{noisy}
{patient}The whole ancestral sampling loop runs in the graph ({method} sampler); the same seed, label
and temperature give the same codes as `keras_vqpix.sampling.sample_codes`.
num_samples above {max_samples} is refused at once (InvalidArgument, nothing allocated): ask for
more in several requests with other seeds. The cap is set by `vqpix export --max-samples` and
recorded in config.json ("serving": {{"max_samples": {max_samples}}}).

Prior fingerprint: {prior_fingerprint} (epoch {prior_epoch}; see prior.json)
VQ-VAE fingerprint: {vqvae_fingerprint} (epoch {vqvae_epoch}; see vqvae.json)
Run config: config.json
Warm-up: assets.extra/tf_serving_warmup_requests (one request per signature, replayed by TF
Serving when it loads this version)
"""


_NOISY_README = """,
             noisy_images float32 (the shape of images): images with MRI acquisition noise
             (Rician; levels of the run's training slices, noise_square.json), drawn from seed
             (sample_patient too: one level per patient)"""

_PATIENT_README = """\
  sample_patient  num_slices int32 scalar, 1 .. {max_slices} (this export's cap), seed, temperature,
          label as above -> one synthetic patient: images float32 [num_slices, {height}, {width}, 1],
          codes int32 [num_slices, {h}, {w}], slice z drawn given slice z - 1 (the stack of
          `keras_vqpix.sampling.sample_stacks`; cap set by `vqpix export --max-slices`)
"""


def _square_noise_levels(paths: RunPaths, on_note) -> NoiseLevels | None:
    """The run's noise levels at the model's resolution, or None (and a note) without them."""
    from keras_vqpix.run_folder import RunFolderError
    from keras_vqpix.synthetic import run_noise_levels

    try:
        return run_noise_levels(paths.root, square=True)
    except RunFolderError as error:
        if on_note is not None:
            on_note(f"the generator is exported without noisy_images: {error}")
        return None


def _write_version_files(
    folder: Path, paths: RunPaths, readme: str, serving: dict | None = None
) -> None:
    """config.json (the run's, plus a `serving` section for the generator), the models' JSON
    and the README."""
    config = paths.config.read_text()
    if serving is not None:
        # A section of its own beside the run's: drop it to read the file as a RunConfig.
        values = {**json.loads(config), "serving": serving}
        config = json.dumps(values, indent=2, sort_keys=True) + "\n"
    _write_file(folder / "config.json", config)
    _write_file(folder / "vqvae.json", paths.vqvae_meta.read_text())
    if serving is not None:
        _write_file(folder / "prior.json", paths.prior_meta.read_text())
    _write_file(folder / "README", readme)


# -- vqpix export -----------------------------------------------------------------------------------
LOCK_NAME = ".export.lock"
# What `atomic_directory` leaves when its process is killed: `.<version>.<random>.tmp` or `.old`.
_LEFTOVER = re.compile(r"^\.\d+\..+\.(tmp|old)$")


@contextlib.contextmanager
def _base_lock(base: Path) -> Iterator[None]:
    """Hold an exclusive lock on the base folder (`BASE/.export.lock`) for one export.

    Concurrent exports into one base wait for each other, so each sees the versions of the
    others and none picks a number another is writing; a folder left by a killed export can
    then be recognised as such. The kernel drops the lock when the process ends, even by
    SIGKILL. (No lock where `fcntl` is missing, i.e. on Windows.)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    base.mkdir(parents=True, exist_ok=True)
    with open(base / LOCK_NAME, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(model_dirs, on_note) -> None:
    """Delete the hidden temporary folders of exports that were killed (call holding the lock)."""
    for folder in model_dirs:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and _LEFTOVER.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                if on_note is not None:
                    on_note(f"Removed {entry}, left by an interrupted export")


def export_run(
    run_dir: str | os.PathLike,
    base: str | os.PathLike = "exported",
    version: int | None = None,
    *,
    serving_base_path: str | None = None,
    max_samples: int = SERVING_MAX_SAMPLES,
    on_note: Callable[[str], None] | None = None,
    method: str = DEFAULT_METHOD,
    max_slices: int = SERVING_MAX_SLICES,
) -> list[Path]:
    """Export the run `run_dir` under `base` for TF Serving; the version folders written.

    Writes `base/vqvae/<version>/`, `base/vqpix_generator/<version>/` (when the run has a
    prior) and adds or updates both models in `base/models.config` (see the module docstring).
    Holds a lock on `base` meanwhile: concurrent exports into one base run one after the other.

    Args:
        run_dir: a run folder with a trained VQ-VAE (and prior).
        base: the TF Serving base path, relative to the working directory.
        version: int >= 1, or None for the next free number; an existing one is refused.
        serving_base_path: the base path as the server sees it (e.g. `/models` inside a
            container), written into `models.config`; default: `base`'s absolute path.
        max_samples: int >= 1, the generator's cap on `num_samples` per request (see the
            module docstring); the default serves in about 1-2 s on one CPU core.
        max_slices: int >= 1, the cap on `num_slices` of `sample_patient` (one patient per
            request, drawn slice after slice).
        on_note: called with one-line notes (a run without a prior exports the VQ-VAE only).
        method: the sampler the generator runs, a key of `keras_vqpix.sampling.SAMPLERS`
            (all draw the same codes; "fast", the default, is the quickest).

    Raises:
        FileExistsError: `version` exists already (checked before any work).
        ValueError: (`RunFolderError`) not a run, no VQ-VAE, a stale prior; a bad option or
            a `models.config` that is not TF Serving's.
    """
    paths = RunPaths(Path(run_dir))
    read_config(paths)
    sampler(method)
    base = Path(base)
    if base.exists() and not base.is_dir():
        raise ValueError(f"--base {base} is a file; choose a folder")
    served_base = _serving_base_path(serving_base_path)
    max_samples = check_max_samples(max_samples)
    max_slices = check_max_samples(max_slices, "--max-slices")
    model_dirs = {VQVAE_NAME: base / VQVAE_NAME, GENERATOR_NAME: base / GENERATOR_NAME}
    # Refused before any work (and before the lock, so a mistake is reported at once).
    choose_version(list(model_dirs.values()), version)
    read_models_config(base / MODELS_CONFIG)
    with _base_lock(base):
        _remove_leftovers(model_dirs.values(), on_note)
        version = choose_version(list(model_dirs.values()), version)
        written = _export_versions(
            paths, model_dirs, version, (max_samples, max_slices), on_note, method
        )
        served = {
            name: posixpath.join(served_base, name) if served_base else str(folder.resolve())
            for name, folder in model_dirs.items()
            if existing_versions(folder)
        }
        update_models_config(base / MODELS_CONFIG, served)
    return written


def _export_versions(
    paths: RunPaths,
    model_dirs: dict[str, Path],
    version: int,
    caps: tuple[int, int],
    on_note,
    method: str,
):
    """Write version `version` of the models of the run `paths` (see `export_run`); `caps`:
    `(max_samples, max_slices)`."""
    max_samples, max_slices = caps
    from keras_vqpix import __version__

    config = read_config(paths)
    vqvae, _, vqvae_meta = load_vqvae(paths.root)
    prior = prior_meta = None
    if paths.prior_model.exists() or paths.prior_meta.exists():
        prior, prior_meta = load_prior(paths.root, vqvae_meta)
    elif on_note is not None:
        on_note(
            f"{paths.root} has no prior yet: exporting the VQ-VAE only "
            f"(train the prior with `vqpix train --out {paths.root} --stage prior`)"
        )

    size = config.data.image_size
    image_shape = (size, size)
    factor = vqvae.downsample_factor
    code_shape = tuple(prior.code_shape) if prior is not None and prior.code_shape else None
    code_shape = code_shape or (size // factor, size // factor)
    fields = {
        "version": version,
        "run": paths.root.resolve(),
        "package_version": __version__,
        "tf_version": tf.__version__,
        "height": image_shape[0],
        "width": image_shape[1],
        "h": code_shape[0],
        "w": code_shape[1],
        "k": vqvae.num_embeddings,
        "vqvae_fingerprint": vqvae_meta.get("fingerprint"),
        "vqvae_epoch": vqvae_meta.get("epoch"),
    }

    written = []
    with contextlib.ExitStack() as stack:
        # Both versions are renamed into place only when both are complete (on leaving the
        # stack); any exception removes both temporary folders.
        folder = stack.enter_context(atomic_directory(model_dirs[VQVAE_NAME] / str(version)))
        vqvae_archive(vqvae, image_shape).write_out(str(folder), verbose=False)
        write_warmup_requests(folder, VQVAE_NAME, _vqvae_warmup(image_shape, code_shape))
        readme = _VQVAE_README.format(name=VQVAE_NAME, **fields)
        _write_version_files(folder, paths, readme)
        written.append(model_dirs[VQVAE_NAME] / str(version))
        if prior is not None:
            folder = stack.enter_context(
                atomic_directory(model_dirs[GENERATOR_NAME] / str(version))
            )
            noise_levels = _square_noise_levels(paths, on_note)
            archive = generator_archive(
                vqvae, prior, code_shape, method, max_samples, max_slices, noise_levels
            )
            archive.write_out(str(folder), verbose=False)
            write_warmup_requests(folder, GENERATOR_NAME, _generator_warmup(prior, max_slices))
            labels = (
                "0 NC, 1 AD, -1 unconditional"
                if prior.conditional
                else "-1 only: the prior is unconditional"
            )
            patient = ""
            if getattr(prior, "previous_slice", False):
                patient = _PATIENT_README.format(
                    max_slices=max_slices,
                    h=code_shape[0],
                    w=code_shape[1],
                    **{k: fields[k] for k in ("height", "width")},
                )
            readme = _GENERATOR_README.format(
                name=GENERATOR_NAME,
                noisy=_NOISY_README if noise_levels is not None else "",
                labels=labels,
                method=method,
                max_samples=max_samples,
                patient=patient,
                prior_fingerprint=prior_meta.get("fingerprint"),
                prior_epoch=prior_meta.get("epoch"),
                **fields,
            )
            serving = {"max_samples": max_samples, "sampler": method}
            if patient:
                serving["max_slices"] = max_slices
            _write_version_files(folder, paths, readme, serving)
            if noise_levels is not None:
                (folder / "noise_square.json").write_text(noise_levels.to_json() + "\n")
            written.append(model_dirs[GENERATOR_NAME] / str(version))
    return written
