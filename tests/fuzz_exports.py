"""Feed every signature of a `vqpix export` a few hundred generated inputs, with TensorFlow alone.

    python tests/fuzz_exports.py VQVAE_DIR GENERATOR_DIR OUT_JSON [--seed 0] [--random 60]

Run in a subprocess by tests/test_serving.py (a crash or a hang must not take pytest with it).
Never imports keras_vqpix: it loads the SavedModels as TF Serving would (`tf.saved_model.load`)
and calls `vqvae` (`serving_default`, `encode`, `decode`) and `vqpix_generator` (`sample`,
`serving_default`) with:

- bad inputs, each expected to be refused with an error: wrong dtypes, ranks and shapes, empty
  and huge dimensions, NaN/Inf and out-of-range pixels, negative and out-of-range codes,
  num_samples below 1 or above the cap, bad labels and temperatures, missing and unknown
  inputs; one fault at a time from each family;
- `--random` inputs drawn at random: tensors of random rank, dims, dtype and values for the
  VQ-VAE, and `sample` calls whose scalars are each replaced by a fault with probability 1/4
  (what each must do follows from what was drawn: refused, answered, or empty);
- good inputs at the edges, each expected to succeed with outputs of the right shape, dtype
  and range: num_samples 1 and the cap, temperatures from float32's smallest normal number to
  its largest, int32's extreme seeds, every label, pixels exactly 0 and 1, codes 0 and K - 1;
- empty batches (0 images or code maps), answered by an empty result of the right shape
  (no model runs on them: oneDNN's Conv2D answers an empty batch with a wrong shape).

First each version's warm-up requests are replayed, as TF Serving replays them on loading
(`assets.extra/tf_serving_warmup_requests`: a signature's first call builds its graph). Before
the cases, the oversized `sample` requests (cap + 1, 10^8, 2^31 - 1 maps) are timed with the
process's resident and peak memory around each. Writes one JSON report (`OUT_JSON`).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.load import peak_resident_bytes, resident_bytes  # noqa: E402

INT32 = (-(2**31), 2**31 - 1)
TINY, HUGE = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
BAD_DTYPES = (np.float64, np.float16, np.int64, np.int16, np.uint8, bool, "string")


class Case:
    """One call: a signature, its inputs (numpy values or a string tensor), what must happen."""

    def __init__(self, model, signature, name, inputs, expect, family, field=None):
        self.model, self.signature, self.name = model, signature, name
        self.inputs, self.expect, self.family, self.field = inputs, expect, family, field


def as_dtype(value, dtype):
    if dtype == "string":
        return np.full(np.shape(value), "0.5", dtype=object)
    with np.errstate(over="ignore", invalid="ignore"):  # e.g. int32's extremes as float16
        return np.asarray(value).astype(dtype)


class Generator:
    """The cases for one export (its shapes, K, cap and labels read from the export itself)."""

    def __init__(
        self, rng, image_shape, code_shape, num_embeddings, cap, conditional, slice_cap=None
    ):
        self.rng, self.cap, self.k = rng, cap, num_embeddings
        self.slice_cap = slice_cap  # `sample_patient`'s cap, None without that signature
        self.image_shape, self.code_shape = image_shape, code_shape
        self.labels = (-1, 0, 1) if conditional else (-1,)
        self.bad_labels = (-2, 2, 3, INT32[0], INT32[1]) + (() if conditional else (0, 1))

    # -- good inputs
    def images(self, n=None):
        n = self.rng.integers(1, 5) if n is None else n
        return self.rng.random((n, *self.image_shape), np.float32)

    def codes(self, n=None):
        n = self.rng.integers(1, 5) if n is None else n
        return self.rng.integers(0, self.k, (n, *self.code_shape)).astype(np.int32)

    def sample_inputs(self, n=None):
        return {
            "num_samples": np.int32(self.rng.integers(1, min(self.cap, 3) + 1) if n is None else n),
            "seed": np.int32(self.rng.integers(*INT32, endpoint=True)),
            "temperature": np.float32(1.0),
            "label": np.int32(self.rng.choice(self.labels)),
        }

    # -- faults: (family, value) pairs for one input
    def tensor_faults(self, good, field, bad_values):
        """Faults of an image or code tensor `good` [n, ...]."""
        faults = [("dtype", as_dtype(good, d)) for d in BAD_DTYPES]
        shape = good.shape
        for wrong in (
            (),
            shape[1:2],
            shape[1:3],
            shape[:3] if len(shape) == 4 else shape[:2],
            (*shape, 1),
            (*shape, 2),
        ):
            faults.append(("rank", np.zeros(wrong, good.dtype)))
        for axis in range(1, len(shape)):
            for size in (0, 1, shape[axis] - 1, shape[axis] + 1, 2 * shape[axis], 2**16):
                if size == shape[axis] or size < 0:
                    continue
                wrong = list(shape[:1]) + [1] * (len(shape) - 1)
                wrong[axis] = size
                if size != 2**16:  # others keep their sizes; a huge one stays small in total
                    wrong = list(shape)
                    wrong[axis] = size
                faults.append(("shape", np.zeros(wrong, good.dtype)))
        for value in bad_values:
            bad = good.copy()
            bad[tuple(self.rng.integers(0, s) for s in shape)] = value
            faults.append(("value", bad))
        return [(family, field, value) for family, value in faults]

    def vqvae_cases(self):
        cases = []
        for signature in ("serving_default", "encode"):
            image_faults = self.tensor_faults(
                self.images(2), "images", (np.nan, np.inf, -np.inf, -1e-6, 1.0 + 1e-6, HUGE, -HUGE)
            )
            image_faults.append(
                ("value", "images", np.full((2, *self.image_shape), np.nan, np.float32))
            )
            for i, (family, field, value) in enumerate(image_faults):
                cases.append(
                    Case(
                        "vqvae",
                        signature,
                        f"{family}_{i}",
                        {field: value},
                        "refused",
                        family,
                        field,
                    )
                )
            cases += self.common_faults("vqvae", signature, {"images": self.images(1)})
            for i, good in enumerate(
                (
                    self.images(1),
                    self.images(16),
                    np.zeros((2, *self.image_shape), np.float32),
                    np.ones((2, *self.image_shape), np.float32),
                    np.full((1, *self.image_shape), -0.0, np.float32),
                    np.full((1, *self.image_shape), 1e-40, np.float32),  # subnormal, in [0, 1]
                )
            ):
                cases.append(Case("vqvae", signature, f"good_{i}", {"images": good}, "ok", "good"))
            cases.append(
                Case("vqvae", signature, "empty", {"images": self.images(0)}, "empty", "empty")
            )
        code_faults = self.tensor_faults(self.codes(2), "codes", (-1, self.k, self.k + 1, *INT32))
        for i, (family, field, value) in enumerate(code_faults):
            cases.append(
                Case("vqvae", "decode", f"{family}_{i}", {field: value}, "refused", family, field)
            )
        cases += self.common_faults("vqvae", "decode", {"codes": self.codes(1)})
        for i, good in enumerate(
            (
                self.codes(1),
                self.codes(16),
                np.zeros((1, *self.code_shape), np.int32),
                np.full((1, *self.code_shape), self.k - 1, np.int32),
            )
        ):
            cases.append(Case("vqvae", "decode", f"good_{i}", {"codes": good}, "ok", "good"))
        cases.append(Case("vqvae", "decode", "empty", {"codes": self.codes(0)}, "empty", "empty"))
        return cases

    def common_faults(self, model, signature, good):
        """A missing input, an unknown one, a misspelt one."""
        field = next(iter(good))
        return [
            Case(
                model,
                signature,
                "missing",
                {k: v for k, v in good.items() if k != field},
                "refused",
                "name",
                field,
            ),
            Case(
                model,
                signature,
                "unknown",
                {**good, "extra": np.int32(1)},
                "refused",
                "name",
                "extra",
            ),
            Case(
                model,
                signature,
                "misspelt",
                {field.upper(): good[field], **{k: v for k, v in good.items() if k != field}},
                "refused",
                "name",
                field,
            ),
        ]

    def scalar_faults(self, cap=None):
        """(family, field, value) faults of the generator's scalar inputs (`cap`: of the count,
        default the cap of `num_samples`)."""
        cap = self.cap if cap is None else cap
        faults = [
            ("value", "num_samples", np.int32(n))
            for n in (0, -1, INT32[0], cap + 1, 10**8, INT32[1])
        ]
        faults += [
            ("value", "temperature", np.float32(t))
            for t in (0.0, -0.0, -1.0, -TINY, np.nan, np.inf, -np.inf, 1e-39, 1e-45)
        ]
        faults += [("value", "label", np.int32(label)) for label in self.bad_labels]
        good = self.sample_inputs(1)
        for field, value in good.items():
            # BAD_DTYPES holds neither int32 nor float32: each is wrong for every input.
            other = np.int32 if field == "temperature" else np.float32
            for dtype in (*BAD_DTYPES, other):
                faults.append(("dtype", field, as_dtype(value, dtype)))
            for shape in ((1,), (0,), (2,), (1, 1)):
                faults.append(("rank", field, np.full(shape, value)))
        return faults

    def generator_cases(self):
        cases = []
        for signature in ("sample", "serving_default"):
            for i, (family, field, value) in enumerate(self.scalar_faults()):
                inputs = {**self.sample_inputs(), field: value}
                cases.append(
                    Case(
                        "generator",
                        signature,
                        f"{family}_{field}_{i}",
                        inputs,
                        "refused",
                        family,
                        field,
                    )
                )
            cases += self.common_faults("generator", signature, self.sample_inputs(1))
        goods = [self.sample_inputs(1), self.sample_inputs(self.cap)]
        for temperature in (TINY, 1e-30, 1e-6, 1e6, 1e30, HUGE):
            goods.append({**self.sample_inputs(2), "temperature": np.float32(temperature)})
        for seed in (INT32[0], INT32[1], 0):
            goods.append({**self.sample_inputs(1), "seed": np.int32(seed)})
        for label in self.labels:
            goods.append({**self.sample_inputs(1), "label": np.int32(label)})
        for i, inputs in enumerate(goods):
            cases.append(Case("generator", "sample", f"good_{i}", inputs, "ok", "good"))
        cases.append(
            Case(
                "generator",
                "serving_default",
                "good_cap",
                self.sample_inputs(self.cap),
                "ok",
                "good",
            )
        )
        return cases + self.patient_cases()

    def patient_inputs(self, n=None):
        """`sample_patient`'s inputs: those of `sample` with num_slices for num_samples."""
        inputs = self.sample_inputs(1)
        del inputs["num_samples"]
        count = self.rng.integers(1, min(self.slice_cap, 3) + 1) if n is None else n
        return {"num_slices": np.int32(count), **inputs}

    def patient_cases(self):
        """`sample_patient` (a run whose prior reads the previous slice): the scalar faults of
        `sample` with num_slices (its cap) for num_samples, and good edges."""
        if self.slice_cap is None:
            return []
        cases = []
        for i, (family, field, value) in enumerate(self.scalar_faults(self.slice_cap)):
            field = "num_slices" if field == "num_samples" else field
            inputs = {**self.patient_inputs(), field: value}
            cases.append(
                Case(
                    "generator",
                    "sample_patient",
                    f"{family}_{field}_{i}",
                    inputs,
                    "refused",
                    family,
                    field,
                )
            )
        cases += self.common_faults("generator", "sample_patient", self.patient_inputs(1))
        goods = [self.patient_inputs(1), self.patient_inputs(self.slice_cap)]
        goods.append({**self.patient_inputs(2), "temperature": np.float32(TINY)})
        goods.append({**self.patient_inputs(2), "seed": np.int32(INT32[0])})
        for i, inputs in enumerate(goods):
            cases.append(Case("generator", "sample_patient", f"good_{i}", inputs, "ok", "good"))
        return cases

    def random_tensor(self, good_shape, good_dtype, sample_good, bad_values):
        """A random tensor near `good_shape` / `good_dtype`, and what a call with it must do."""
        rng = self.rng
        rank = len(good_shape) + 1 if rng.random() < 0.75 else int(rng.integers(0, 6))
        shape = [int(rng.choice([0, 1, 1, 2, 3]))]
        for axis in range(1, rank):
            right = good_shape[axis - 1] if axis - 1 < len(good_shape) else 1
            shape.append(int(rng.choice([right] * 6 + [0, 1, right + 1, max(right - 1, 0), 2**12])))
        shape = shape[:rank]
        while int(np.prod(shape)) > 2**20:  # huge dimensions, but a few MB at most in total
            shape[int(np.argmax(shape))] //= 16
        value = sample_good(shape) if rank else sample_good([1]).reshape(())
        bad_value = rng.random() < 0.3 and value.size > 0
        if bad_value:
            value.flat[rng.integers(value.size)] = rng.choice(bad_values)
        dtype = good_dtype if rng.random() < 0.7 else BAD_DTYPES[rng.integers(len(BAD_DTYPES))]
        value = as_dtype(value, dtype) if dtype != good_dtype else value
        right_shape = rank == len(good_shape) + 1 and tuple(shape[1:]) == tuple(good_shape)
        if dtype != good_dtype or not right_shape or bad_value:
            return value, "refused"
        return value, "empty" if shape[0] == 0 else "ok"

    def random_cases(self, count):
        """`count` random inputs: tensors of random rank, dims, dtype and values for the VQ-VAE;
        each scalar of `sample` replaced by one of its faults with probability 1/4."""
        cases = []
        scalar_faults = {}
        for family, field, value in self.scalar_faults():
            scalar_faults.setdefault(field, []).append((family, value))
        for i in range(count):
            kind = i % 3
            if kind == 0:
                signature = str(self.rng.choice(["serving_default", "encode"]))
                value, expect = self.random_tensor(
                    self.image_shape,
                    np.float32,
                    lambda shape: self.rng.random(shape, np.float32),
                    (np.nan, np.inf, -np.inf, -0.5, 1.5, HUGE),
                )
                cases.append(
                    Case(
                        "vqvae",
                        signature,
                        f"random_{i}",
                        {"images": value},
                        expect,
                        "random",
                        "images",
                    )
                )
            elif kind == 1:
                value, expect = self.random_tensor(
                    self.code_shape,
                    np.int32,
                    lambda shape: self.rng.integers(0, self.k, shape).astype(np.int32),
                    (-1, self.k, INT32[0], INT32[1]),
                )
                cases.append(
                    Case(
                        "vqvae",
                        "decode",
                        f"random_{i}",
                        {"codes": value},
                        expect,
                        "random",
                        "codes",
                    )
                )
            else:
                inputs, faulty = self.sample_inputs(), []
                for field, faults in scalar_faults.items():
                    if self.rng.random() < 0.25:
                        inputs[field] = faults[self.rng.integers(len(faults))][1]
                        faulty.append(field)
                signature = str(self.rng.choice(["sample", "serving_default"]))
                expect = "refused" if faulty else "ok"
                cases.append(
                    Case(
                        "generator",
                        signature,
                        f"random_{i}",
                        inputs,
                        expect,
                        "random",
                        ",".join(faulty) or None,
                    )
                )
        return cases


def to_tensor(value):
    if isinstance(value, np.ndarray) and value.dtype == object:
        return tf.constant(value.astype(str))
    return tf.constant(value)


def check_outputs(case, outputs, info):
    """'' when the outputs of a good (or empty) call have the right shape, dtype and range."""
    if case.model == "generator":
        n = int(case.inputs["num_slices" if case.signature == "sample_patient" else "num_samples"])
        images, codes = outputs["images"], outputs["codes"]
    elif case.signature == "decode":
        n = len(case.inputs["codes"])
        images, codes = outputs["images"], None
    else:
        n = len(case.inputs["images"])
        images, codes = outputs.get("reconstruction"), outputs["codes"]
    problems = []
    named = [("images", images)]
    if case.model == "generator" and "noisy_images" in outputs:
        named.append(("noisy_images", outputs["noisy_images"]))
    for name, values in named:
        if values is None:
            continue
        if values.dtype != np.float32 or values.shape != (n, *info["image_shape"]):
            problems.append(f"{name} {values.dtype} {values.shape}")
        elif values.size and not (
            np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
        ):
            problems.append(f"{name} outside [0, 1]")
    if codes is not None:
        if codes.dtype != np.int32 or codes.shape != (n, *info["code_shape"]):
            problems.append(f"codes {codes.dtype} {codes.shape}")
        elif codes.size and not (codes.min() >= 0 and codes.max() < info["num_embeddings"]):
            problems.append(
                f"codes outside [0, {info['num_embeddings']}): {codes.min()} .. {codes.max()}"
            )
    return "; ".join(problems)


def timed_call(fn, tensors: dict):
    """`(outputs as NumPy or None, error text or "", seconds)` of one signature call."""
    start = time.perf_counter()
    try:
        outputs, error = {k: v.numpy() for k, v in fn(**tensors).items()}, ""
    except Exception as failure:
        outputs, error = None, type(failure).__name__ + ": " + " ".join(str(failure).split())
    return outputs, error, time.perf_counter() - start


def run_case(case, functions, info):
    fn = functions[case.model][case.signature]
    tensors = {k: to_tensor(v) for k, v in case.inputs.items()}
    outputs, error, seconds = timed_call(fn, tensors)
    wrong = ""
    if outputs is not None and case.expect in ("ok", "empty"):
        wrong = check_outputs(case, outputs, info)
    answered = case.expect in ("ok", "empty")  # with the right shapes, dtypes and ranges
    passed = (not error and not wrong) if answered else bool(error)
    return {
        "model": case.model,
        "signature": case.signature,
        "name": case.name,
        "family": case.family,
        "field": case.field,
        "expect": case.expect,
        "passed": passed,
        "error": error[:400],
        "wrong_output": wrong,
        "seconds": seconds,
        "inputs": {
            k: f"{getattr(v, 'dtype', type(v).__name__)}{list(np.shape(v))}"
            for k, v in case.inputs.items()
        },
    }


def replay_warmup(version: Path, functions) -> list[dict]:
    """Call each request of the version's `assets.extra/tf_serving_warmup_requests` (TF Serving's
    `PredictionLog` records) on its signature, as the server does when it loads a version."""
    from tensorflow_serving.apis import prediction_log_pb2

    rows = []
    path = version / "assets.extra" / "tf_serving_warmup_requests"
    for record in tf.data.TFRecordDataset(str(path)):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        signature = request.model_spec.signature_name
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        _, error, seconds = timed_call(functions[signature], inputs)
        rows.append(
            {
                "model": request.model_spec.name,
                "signature": signature,
                "seconds": seconds,
                "error": error[:400],
            }
        )
    return rows


def oversized(functions, cap, label):
    rows = []
    sample = functions["generator"]["sample"]
    for n in (cap + 1, 10**8, INT32[1]):
        inputs = {"num_samples": n, "seed": 0, "temperature": 1.0, "label": label}
        tensors = {
            k: tf.constant(v, tf.float32 if k == "temperature" else tf.int32)
            for k, v in inputs.items()
        }
        rss, peak = resident_bytes(), peak_resident_bytes()
        _, error, seconds = timed_call(sample, tensors)
        rows.append(
            {
                "num_samples": n,
                "seconds": seconds,
                "error": error[:400],
                "rss_growth_bytes": resident_bytes() - rss,
                "peak_growth_bytes": peak_resident_bytes() - peak,
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vqvae", type=Path)
    parser.add_argument("generator", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=60)
    parser.add_argument("--hang-seconds", type=float, default=240.0)
    args = parser.parse_args(argv)
    # A hang ends the process with every thread's traceback (the test sees a failed exit).
    faulthandler.dump_traceback_later(args.hang_seconds, exit=True)
    started = time.perf_counter()
    loaded = {
        "vqvae": tf.saved_model.load(str(args.vqvae)),
        "generator": tf.saved_model.load(str(args.generator)),
    }
    functions = {name: model.signatures for name, model in loaded.items()}
    config = json.loads((args.generator / "config.json").read_text())
    encode = functions["vqvae"]["encode"].structured_input_signature[1]["images"]
    decode = functions["vqvae"]["decode"].structured_input_signature[1]["codes"]
    info = {
        "image_shape": tuple(encode.shape[1:]),
        "code_shape": tuple(decode.shape[1:]),
        "num_embeddings": int(config["vqvae"]["num_embeddings"]),
        "cap": int(config["serving"]["max_samples"]),
        "conditional": bool(config["prior"]["conditional"]),
        "slice_cap": config["serving"].get("max_slices"),
    }
    generator = Generator(
        np.random.default_rng(args.seed),
        info["image_shape"],
        info["code_shape"],
        info["num_embeddings"],
        info["cap"],
        info["conditional"],
        info["slice_cap"],
    )
    # Warm-up as TF Serving does it: each version's warm-up requests replayed on loading (a
    # signature's first call builds its graph); the cases below are then timed as served.
    warmup = {
        "vqvae": replay_warmup(args.vqvae, functions["vqvae"]),
        "generator": replay_warmup(args.generator, functions["generator"]),
    }
    probes = oversized(functions, info["cap"], generator.labels[-1])
    vqvae_cases, generator_cases = generator.vqvae_cases(), generator.generator_cases()
    cases = vqvae_cases + generator_cases + generator.random_cases(args.random)
    results = [run_case(case, functions, info) for case in cases]
    faulthandler.cancel_dump_traceback_later()
    report = {
        "info": {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()},
        "warmup": warmup,
        "oversized": probes,
        "results": results,
        "seconds": time.perf_counter() - started,
        "keras_vqpix_imported": any(m.split(".")[0] == "keras_vqpix" for m in sys.modules),
    }
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
