"""vqpix export: versioned SavedModels that TensorFlow alone loads and runs, as TF Serving would.

The session's quick run is exported once per module (through the CLI). The export is then
loaded in fresh Python processes that never import keras_vqpix (`tf.saved_model.load` of both
models in one process, `saved_model_cli`) and by a small C program on TensorFlow's C API (the
loader TF Serving uses); these run side by side in the background while the other tests go on.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vqpix.config import SERVING_MAX_SAMPLES, SERVING_MAX_SLICES
from keras_vqpix_cli.main import main

pytestmark = pytest.mark.large

C_SOURCE = Path(__file__).parent / "c" / "load_saved_model.c"
FOREIGN_CONFIG = """\
model_config_list {
  config { name: "someone_elses" base_path: "/srv/models/someone_elses" model_platform: "tensorflow" }
}
"""
# (num_samples, seed, label, temperature); the first is drawn twice, the last differs from the
# first in its seed only.
SAMPLE_CASES = [(3, 7, 1, 1.0), (2, 7, 0, 0.5), (2, 123, -1, 1.5), (3, 8, 1, 1.0)]
# (num_slices, seed, label, temperature) of `sample_patient`
PATIENT_CASES = [(4, 7, 1, 1.0), (3, 9, 0, 0.8)]
TIMEOUT = 600


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- Scripts run in fresh processes (they must never import keras_vqpix) -----------------------------
LOADER_SCRIPT = """\
import json, sys
import numpy as np
import tensorflow as tf

vqvae_dir, generator_dir, work, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
PATIENT_CASES, MAX_SLICES = json.loads(sys.argv[5])


def describe(loaded):
    return {
        key: {
            "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_input_signature[1].items()},
            "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_outputs.items()},
        }
        for key, fn in loaded.signatures.items()
    }


def error_of(errors, name, fn, **inputs):
    try:
        fn(**inputs)
        errors[name] = ""
    except Exception as error:
        errors[name] = type(error).__name__ + ": " + " ".join(str(error).split())


# -- vqvae
loaded = tf.saved_model.load(vqvae_dir)
vqvae = {"signatures": describe(loaded), "errors": {}}
images = np.load(f"{work}/images.npy")
codes_in = np.load(f"{work}/codes_in.npy")
signatures = loaded.signatures
reconstructed = signatures["serving_default"](images=tf.constant(images))
np.savez(
    f"{work}/vqvae_out.npz",
    reconstruction=reconstructed["reconstruction"].numpy(),
    codes=reconstructed["codes"].numpy(),
    encoded=signatures["encode"](images=tf.constant(images))["codes"].numpy(),
    decoded=signatures["decode"](codes=tf.constant(codes_in))["images"].numpy(),
)
serve, decode, errors = signatures["serving_default"], signatures["decode"], vqvae["errors"]
# Zero images or code maps: empty answers (the models must not run on an empty batch).
no_images = tf.zeros([0, *images.shape[1:]], tf.float32)
no_codes = tf.zeros([0, *codes_in.shape[1:]], tf.int32)
vqvae["empty"] = {
    name: {key: list(value.shape) for key, value in outputs.items()}
    for name, outputs in (
        ("serving_default", serve(images=no_images)),
        ("encode", signatures["encode"](images=no_images)),
        ("decode", decode(codes=no_codes)),
    )
}
error_of(errors, "images_float64", serve, images=tf.constant(images, tf.float64))
error_of(errors, "images_rank_3", serve, images=tf.constant(images[..., 0]))
error_of(errors, "images_too_small", serve, images=tf.constant(images[:, :16, :16]))
error_of(errors, "images_above_1", serve, images=tf.constant(images * 255.0))
error_of(errors, "images_nan", serve, images=tf.constant(np.full_like(images, np.nan)))
error_of(errors, "encode_rank_5", signatures["encode"], images=tf.constant(images[None]))
error_of(errors, "codes_too_large", decode, codes=tf.constant(np.full_like(codes_in, 10**6)))
error_of(errors, "codes_negative", decode, codes=tf.constant(-np.ones_like(codes_in)))
error_of(errors, "codes_float", decode, codes=tf.constant(codes_in, tf.float32))
error_of(errors, "codes_rank_2", decode, codes=tf.constant(codes_in[0]))

# -- vqpix_generator
loaded = tf.saved_model.load(generator_dir)
generator = {"signatures": describe(loaded), "errors": {}}
generator["variables"] = [v.name for v in loaded.variables]
sample = loaded.signatures["sample"]


def inputs(num_samples, seed, label, temperature, count="num_samples"):
    return {
        count: tf.constant(num_samples, tf.int32),
        "seed": tf.constant(seed, tf.int32),
        "label": tf.constant(label, tf.int32),
        "temperature": tf.constant(temperature, tf.float32),
    }


outputs = {}
for i, case in enumerate(cases):
    for name, fn in (("sample", sample), ("serving_default", loaded.signatures["serving_default"])):
        drawn = fn(**inputs(*case))
        outputs[f"{name}_codes_{i}"] = drawn["codes"].numpy()
        outputs[f"{name}_images_{i}"] = drawn["images"].numpy()
outputs["codes_again_0"] = sample(**inputs(*cases[0]))["codes"].numpy()
patient = loaded.signatures["sample_patient"]
for i, (num_slices, seed, label, temperature) in enumerate(PATIENT_CASES):
    drawn = patient(**inputs(num_slices, seed, label, temperature, count="num_slices"))
    outputs[f"patient_codes_{i}"] = drawn["codes"].numpy()
    outputs[f"patient_images_{i}"] = drawn["images"].numpy()
np.savez(f"{work}/generator_out.npz", **outputs)
error_of(
    generator["errors"], "num_slices_cap", patient,
    **inputs(MAX_SLICES + 1, 7, 1, 1.0, count="num_slices"),
)

good = inputs(*cases[0])
for name, changes in {
    "num_samples_0": dict(num_samples=tf.constant(0)),
    "temperature_0": dict(temperature=tf.constant(0.0)),
    "temperature_nan": dict(temperature=tf.constant(float("nan"))),
    "label_2": dict(label=tf.constant(2)),
    "label_minus_2": dict(label=tf.constant(-2)),
    "num_samples_float": dict(num_samples=tf.constant(3.0)),
    "label_int64": dict(label=tf.constant(1, tf.int64)),
    "seed_rank_1": dict(seed=tf.constant([7])),
    "temperature_rank_1": dict(temperature=tf.constant([1.0, 1.0])),
}.items():
    error_of(generator["errors"], name, sample, **{**good, **changes})

imported = any(module.split(".")[0] == "keras_vqpix" for module in sys.modules)
for name, report in (("vqvae", vqvae), ("generator", generator)):
    report["keras_vqpix_imported"] = imported
    with open(f"{work}/{name}.json", "w") as handle:
        json.dump(report, handle)
"""


class Job:
    """A command run in the background, its output in files (no pipe to fill up)."""

    def __init__(self, args, work: Path, name: str):
        self.args, self.name = [str(a) for a in args], name
        self.stdout, self.stderr = work / f"{name}.out", work / f"{name}.err"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=err, cwd=work, env=env)

    def result(self) -> subprocess.CompletedProcess:
        returncode = self.process.wait(timeout=TIMEOUT)
        return subprocess.CompletedProcess(
            self.args, returncode, self.stdout.read_text(), self.stderr.read_text()
        )

    def ok(self) -> subprocess.CompletedProcess:
        done = self.result()
        assert done.returncode == 0, f"{self.name} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        return done


# -- Fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(quick_run, tmp_path_factory):
    """`vqpix export RUN --base BASE` of the session's quick run, into a base whose models.config
    already lists another model: (base, CLI output)."""
    base = tmp_path_factory.mktemp("export") / "exported"
    base.mkdir()
    (base / "models.config").write_text(FOREIGN_CONFIG)
    result = invoke("export", quick_run, "--base", base)
    assert result.exit_code == 0, result.output
    return base, result.output


@pytest.fixture(scope="module")
def reference(quick_run, exported, tmp_path_factory):
    """The in-memory models' outputs (this process), saved as .npy for the fresh processes."""
    from keras_vqpix.run_folder import load_prior, load_vqvae
    from keras_vqpix.sampling import decode_codes, sample_codes, sample_stacks

    work = tmp_path_factory.mktemp("export_work")
    vqvae, config, vqvae_meta = load_vqvae(quick_run)
    prior, _ = load_prior(quick_run, vqvae_meta)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    head = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16).astype(np.float32)
    images = np.clip(head[None, ..., None] * rng.uniform(0.3, 1.0, (3, size, size, 1)), 0, 1)
    images = images.astype(np.float32)
    outputs = vqvae(images, training=False)
    code_shape = tuple(prior.code_shape)
    codes_in = rng.integers(0, vqvae.num_embeddings, (2, *code_shape)).astype(np.int32)
    np.save(work / "images.npy", images)
    np.save(work / "codes_in.npy", codes_in)
    sampled = [
        sample_codes(prior, n, seed, label, temperature)
        for n, seed, label, temperature in SAMPLE_CASES
    ]
    patients = [
        sample_stacks(prior, 1, num_slices, seed, label, temperature)[0]
        for num_slices, seed, label, temperature in PATIENT_CASES
    ]
    return {
        "work": work,
        "images": images,
        "reconstruction": outputs["reconstruction"].numpy(),
        "codes": outputs["codes"].numpy(),
        "encoded": vqvae.encode(images).numpy(),
        "codes_in": codes_in,
        "decoded": vqvae.decode(codes_in).numpy(),
        "sampled": sampled,
        "sampled_images": [decode_codes(vqvae, codes) for codes in sampled],
        "patients": patients,
        "patient_images": [decode_codes(vqvae, codes) for codes in patients],
        "num_embeddings": vqvae.num_embeddings,
        "image_size": size,
        "code_shape": code_shape,
    }


@pytest.fixture(scope="session")
def c_loader(tmp_path_factory) -> Path:
    """`tests/c/load_saved_model.c` compiled against the TensorFlow wheel's C API (once per session)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        print("gcc not found: the C API loading test needs a C compiler")
        pytest.skip("gcc not found: the C API loading test needs a C compiler")
    tf_dir = Path(sysconfig.get_paths()["purelib"]) / "tensorflow"
    assert (tf_dir / "include" / "tensorflow" / "c" / "c_api.h").is_file()
    binary = tmp_path_factory.mktemp("c_loader") / "load_saved_model"
    command = [
        gcc,
        "-O1",
        "-Wall",
        "-Werror",
        "-o",
        binary,
        C_SOURCE,
        f"-I{tf_dir / 'include'}",
        f"-L{tf_dir}",
        "-l:libtensorflow_cc.so.2",
        "-l:libtensorflow_framework.so.2",
        f"-Wl,-rpath,{tf_dir}",
    ]
    # gold links against the 1 GB libtensorflow_cc in seconds; GNU ld takes far longer.
    for extra in (["-fuse-ld=gold"], []):
        done = subprocess.run(
            [str(a) for a in command + extra], capture_output=True, text=True, timeout=TIMEOUT
        )
        if done.returncode == 0:
            return binary
    raise AssertionError(f"compiling {C_SOURCE} failed:\n{done.stderr}")


def signature_tensor(meta_graph, signature: str, kind: str, key: str) -> str:
    return getattr(meta_graph.signature_def[signature], kind)[key].name


@pytest.fixture(scope="module")
def jobs(exported, reference, c_loader):
    """Every out-of-process check, started at once in the background."""
    from tensorflow.core.protobuf import saved_model_pb2

    base, _ = exported
    work = reference["work"]
    script = work / "load_exports.py"
    script.write_text(LOADER_SCRIPT)
    cli = Path(sys.executable).with_name("saved_model_cli")
    # The C program feeds the tensors the SavedModel's own signature names.
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((base / "vqpix_generator" / "1" / "saved_model.pb").read_bytes())
    meta = saved_model.meta_graphs[0]
    n, seed, label, temperature = SAMPLE_CASES[0]
    feeds = []
    for key, dtype, value in (
        ("num_samples", "int32", n),
        ("seed", "int32", seed),
        ("label", "int32", label),
        ("temperature", "float32", temperature),
    ):
        feeds += [signature_tensor(meta, "sample", "inputs", key), dtype, value]
    fetches = ["-o", signature_tensor(meta, "sample", "outputs", "codes"), work / "c_codes.bin"]
    started = {
        "loader": Job(
            [
                sys.executable,
                script,
                base / "vqvae" / "1",
                base / "vqpix_generator" / "1",
                work,
                json.dumps(SAMPLE_CASES),
                json.dumps([PATIENT_CASES, SERVING_MAX_SLICES]),
            ],
            work,
            "loader",
        ),
        "saved_model_cli": Job(
            [
                cli,
                "run",
                "--dir",
                base / "vqvae" / "1",
                "--tag_set",
                "serve",
                "--signature_def",
                "serving_default",
                "--inputs",
                f"images={work / 'images.npy'}",
                "--outdir",
                work / "cli_out",
            ],
            work,
            "saved_model_cli",
        ),
        "c_vqvae": Job([c_loader, base / "vqvae" / "1", work / "c_vqvae.pb"], work, "c_vqvae"),
        "c_generator": Job(
            [c_loader, base / "vqpix_generator" / "1", work / "c_generator.pb", *feeds, *fetches],
            work,
            "c_generator",
        ),
    }
    yield started
    for job in started.values():
        if job.process.poll() is None:
            job.process.kill()
            job.process.wait()


def report(jobs, reference, name: str) -> dict:
    """What the fresh process (`LOADER_SCRIPT`) found in the export `name`."""
    jobs["loader"].ok()
    values = json.loads((reference["work"] / f"{name}.json").read_text())
    assert values["keras_vqpix_imported"] is False
    return values


# -- The layout -------------------------------------------------------------------------------------
def test_cli_prints_the_versions_and_writes_the_layout(exported, quick_run, jobs):
    base, output = exported
    umask = os.umask(0o022)
    os.umask(umask)
    assert f"Exported {base / 'vqvae' / '1'}" in output
    assert f"Exported {base / 'vqpix_generator' / '1'}" in output
    generator_files = ["prior.json", "noise_square.json"]
    for model, extra in (("vqvae", []), ("vqpix_generator", generator_files)):
        folder = base / model
        assert sorted(p.name for p in folder.iterdir()) == ["1"]  # no temporary folder left
        version = folder / "1"
        names = {p.name for p in version.iterdir()}
        assert names >= {"saved_model.pb", "variables", "config.json", "vqvae.json", "README"}
        assert names >= set(extra)
        config = (version / "config.json").read_text()
        if model == "vqpix_generator":  # the run's, plus the export's cap (tests/test_serving.py)
            values = json.loads(config)
            assert values.pop("serving") == {
                "max_samples": SERVING_MAX_SAMPLES,
                "max_slices": SERVING_MAX_SLICES,
                "sampler": "fast",
            }
            assert values == json.loads((quick_run / "config.json").read_text())
        else:
            assert config == (quick_run / "config.json").read_text()
        readme = (version / "README").read_text()
        fingerprint = json.loads((quick_run / "vqvae.json").read_text())["fingerprint"]
        assert fingerprint in readme and "signature" in readme.lower()
        # Weights are variables, not constants in the graph: the graph stays small.
        size = (version / "saved_model.pb").stat().st_size
        print(f"{model}/1/saved_model.pb: {size} bytes")
        assert size < 2_000_000
        # Readable by a server running as another user (not mkdtemp's 0700).
        assert stat.S_IMODE(version.stat().st_mode) == 0o777 & ~umask
    prior_fingerprint = json.loads((quick_run / "prior.json").read_text())["fingerprint"]
    generator_readme = (base / "vqpix_generator" / "1" / "README").read_text()
    assert prior_fingerprint in generator_readme
    assert f"num_samples int32 scalar, 1 .. {SERVING_MAX_SAMPLES}" in generator_readme
    assert "(fast sampler)" in generator_readme  # the method the archive was built with
    # The noise levels the generator draws noisy_images from: the run's, at the model's size.
    levels = json.loads((base / "vqpix_generator" / "1" / "noise_square.json").read_text())
    assert levels == json.loads((quick_run / "noise_square.json").read_text())["levels"]
    assert "noisy_images" in generator_readme


def test_an_unknown_sampler_method_is_refused_before_any_export(quick_run, tmp_path):
    from keras_vqpix import export

    with pytest.raises(ValueError, match="method must be one of"):
        export.export_run(quick_run, tmp_path / "exported", method="slow")
    assert not (tmp_path / "exported").exists()


def test_models_config_is_tf_servings_and_keeps_other_models(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    base, _ = exported
    config = text_format.Parse(
        (base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == {"someone_elses", "vqvae", "vqpix_generator"}
    assert entries["someone_elses"].base_path == "/srv/models/someone_elses"
    for name in ("vqvae", "vqpix_generator"):
        assert entries[name].base_path == str((base / name).resolve())
        assert Path(entries[name].base_path).is_absolute()
        assert entries[name].model_platform == "tensorflow"


# -- Versions, failures, the CLI ----------------------------------------------------------------------
def test_exporting_again_writes_version_2_and_never_overwrites(exported, quick_run, jobs):
    base, _ = exported
    leftover = base / "vqvae" / ".7.abcd1234.tmp"  # what a SIGKILLed export leaves behind
    leftover.mkdir()
    (leftover / "saved_model.pb").write_bytes(b"half")
    result = invoke("export", quick_run, "--base", base)
    assert result.exit_code == 0, result.output
    assert f"Exported {base / 'vqvae' / '2'}" in result.output
    assert f"Exported {base / 'vqpix_generator' / '2'}" in result.output
    assert "interrupted export" in result.output and not leftover.exists()
    for model in ("vqvae", "vqpix_generator"):
        assert sorted(p.name for p in (base / model).iterdir()) == ["1", "2"]
    before = (base / "vqvae" / "1" / "saved_model.pb").stat().st_mtime_ns
    for version in (1, 2):
        result = invoke("export", quick_run, "--base", base, "--version", version)
        assert result.exit_code == 2, result.output
        assert f"--version {version}" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert (base / "vqvae" / "1" / "saved_model.pb").stat().st_mtime_ns == before
    config = (base / "models.config").read_text()
    assert config.count('name: "vqvae"') == 1 and "someone_elses" in config


@pytest.mark.parametrize("where", ["after the first file", "in the generator"])
def test_a_failed_export_leaves_no_version_and_no_temporary_folder(
    quick_run, tmp_path, monkeypatch, where
):
    """The export dies right after writing its first file (inside the VQ-VAE's version), or
    in the generator's version, when the VQ-VAE's is complete: nothing is left behind."""
    from keras_vqpix import export

    written = []
    real_write = export._write_file

    def dying_write(path, text):
        if written:
            raise RuntimeError("killed midway")
        real_write(path, text)
        written.append(path)

    def dying_generator(*args, **kwargs):
        assert any((base / "vqvae").glob(".1.*.tmp/saved_model.pb"))  # the VQ-VAE is written
        raise RuntimeError("killed midway")

    if where == "after the first file":
        monkeypatch.setattr(export, "_write_file", dying_write)
    else:
        monkeypatch.setattr(export, "generator_archive", dying_generator)
    base = tmp_path / "exported"
    with pytest.raises(RuntimeError, match="killed midway"):
        export.export_run(quick_run, base)
    if where == "after the first file":
        assert len(written) == 1 and written[0].parent.parent == base / "vqvae"
    for model in ("vqvae", "vqpix_generator"):
        assert not (base / model).exists() or list((base / model).iterdir()) == []
    assert not (base / "models.config").exists()


def test_a_run_without_prior_exports_the_vqvae_only(quick_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "vqvae.keras", "vqvae.json"):
        shutil.copy(quick_run / name, run / name)
    base = tmp_path / "exported"
    result = invoke("export", run, "--base", base, "--serving-base-path", "/models/")
    assert result.exit_code == 0, result.output
    assert "no prior yet: exporting the VQ-VAE only" in result.output
    assert f"Exported {base / 'vqvae' / '1'}" in result.output
    assert not (base / "vqpix_generator").exists()
    config = (base / "models.config").read_text()
    assert 'base_path: "/models/vqvae"' in config and "vqpix_generator" not in config


@pytest.mark.parametrize(
    "change, args, message",
    [
        ("stale_prior", [], "retrain the prior"),
        ("no_run", [], "not a run folder"),
        (None, ["--serving-base-path", "models"], "--serving-base-path must be an absolute"),
        ("broken_config", [], "is not a TF Serving model config"),
    ],
)
def test_bad_input_exits_2_before_any_export(quick_run, tmp_path, change, args, message):
    run, base = quick_run, tmp_path / "exported"
    if change in ("stale_prior", "no_run"):
        run = tmp_path / "run"
        run.mkdir()
    if change == "stale_prior":
        for name in ("config.json", "vqvae.keras", "vqvae.json", "prior.keras"):
            shutil.copy(quick_run / name, run / name)
        meta = json.loads((quick_run / "prior.json").read_text())
        (run / "prior.json").write_text(json.dumps({**meta, "vqvae_fingerprint": "0" * 16}))
    elif change == "broken_config":
        base.mkdir()
        (base / "models.config").write_text("model_config_list { config { nme: 1 } }")
    result = invoke("export", run, "--base", base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    if base.is_dir():
        assert not list(base.rglob("saved_model.pb"))


# -- Loaded in a fresh process, without keras_vqpix ---------------------------------------------------
def test_vqvae_signatures(jobs, reference):
    values = report(jobs, reference, "vqvae")
    size, (h, w) = reference["image_size"], reference["code_shape"]
    images = ["float32", [None, size, size, 1]]
    codes = ["int32", [None, h, w]]
    assert values["signatures"] == {
        "serving_default": {
            "inputs": {"images": images},
            "outputs": {"reconstruction": images, "codes": codes},
        },
        "encode": {"inputs": {"images": images}, "outputs": {"codes": codes}},
        "decode": {"inputs": {"codes": codes}, "outputs": {"images": images}},
    }


def test_vqvae_export_computes_what_the_model_in_memory_computes(jobs, reference):
    report(jobs, reference, "vqvae")
    out = np.load(reference["work"] / "vqvae_out.npz")
    np.testing.assert_allclose(out["reconstruction"], reference["reconstruction"], atol=1e-5)
    np.testing.assert_array_equal(out["codes"], reference["codes"])
    np.testing.assert_array_equal(out["encoded"], reference["encoded"])
    np.testing.assert_allclose(out["decoded"], reference["decoded"], atol=1e-5)
    assert out["codes"].dtype == np.int32 and out["reconstruction"].dtype == np.float32


def test_vqvae_export_answers_zero_images_and_codes_with_empty_outputs(jobs, reference):
    empty = report(jobs, reference, "vqvae")["empty"]
    size, (h, w) = reference["image_size"], reference["code_shape"]
    assert empty == {
        "serving_default": {"reconstruction": [0, size, size, 1], "codes": [0, h, w]},
        "encode": {"codes": [0, h, w]},
        "decode": {"images": [0, size, size, 1]},
    }


def test_vqvae_export_rejects_bad_inputs(jobs, reference):
    errors = report(jobs, reference, "vqvae")["errors"]
    assert all(errors.values()), {k: v for k, v in errors.items() if not v}
    k = reference["num_embeddings"]
    for name in ("images_float64", "codes_float"):
        assert "int32" in errors[name] or "float" in errors[name], errors[name]
    for name in ("images_rank_3", "images_too_small", "encode_rank_5"):
        assert "Shape of tensor images" in errors[name], errors[name]
    assert "Shape of tensor codes" in errors["codes_rank_2"]
    for name in ("images_above_1", "images_nan"):
        assert "images must be float32 in [0, 1]" in errors[name], errors[name]
    for name in ("codes_too_large", "codes_negative"):
        assert f"codes must be in [0, {k})" in errors[name], errors[name]


def test_generator_signatures(jobs, reference):
    values = report(jobs, reference, "generator")
    size, (h, w) = reference["image_size"], reference["code_shape"]
    sample = {
        "inputs": {
            "num_samples": ["int32", []],
            "seed": ["int32", []],
            "temperature": ["float32", []],
            "label": ["int32", []],
        },
        "outputs": {
            "images": ["float32", [None, size, size, 1]],
            "codes": ["int32", [None, h, w]],
            "noisy_images": ["float32", [None, size, size, 1]],
        },
    }
    patient = {
        "inputs": {**sample["inputs"], "num_slices": ["int32", []]},
        "outputs": sample["outputs"],
    }
    del patient["inputs"]["num_samples"]
    assert values["signatures"] == {
        "serving_default": sample,
        "sample": sample,
        "sample_patient": patient,
    }
    # The PixelCNN masks travel as variables (weights), not as constants in the graph.
    assert sum("mask" in name for name in values["variables"]) >= 3


def test_generator_draws_the_codes_of_sample_codes(jobs, reference):
    report(jobs, reference, "generator")
    out = np.load(reference["work"] / "generator_out.npz")
    for i, (n, *_) in enumerate(SAMPLE_CASES):
        for signature in ("sample", "serving_default"):
            codes = out[f"{signature}_codes_{i}"]
            assert codes.dtype == np.int32 and codes.shape == (n, *reference["code_shape"])
            np.testing.assert_array_equal(codes, reference["sampled"][i], err_msg=str(i))
            np.testing.assert_allclose(
                out[f"{signature}_images_{i}"], reference["sampled_images"][i], atol=1e-5
            )


def test_generator_draws_the_patients_of_sample_stacks(jobs, reference):
    values = report(jobs, reference, "generator")
    out = np.load(reference["work"] / "generator_out.npz")
    for i, (num_slices, *_) in enumerate(PATIENT_CASES):
        codes = out[f"patient_codes_{i}"]
        assert codes.shape == (num_slices, *reference["code_shape"])
        np.testing.assert_array_equal(codes, reference["patients"][i], err_msg=str(i))
        np.testing.assert_allclose(
            out[f"patient_images_{i}"], reference["patient_images"][i], atol=1e-5
        )
    assert f"num_slices must be <= {SERVING_MAX_SLICES}" in values["errors"]["num_slices_cap"]


def test_generator_same_seed_same_codes_other_seed_other_codes(jobs, reference):
    report(jobs, reference, "generator")
    out = np.load(reference["work"] / "generator_out.npz")
    np.testing.assert_array_equal(out["codes_again_0"], out["sample_codes_0"])
    assert SAMPLE_CASES[3][1:] != SAMPLE_CASES[0][1:]
    assert (out["sample_codes_3"] != out["sample_codes_0"]).any()


def test_generator_rejects_bad_inputs(jobs, reference):
    errors = report(jobs, reference, "generator")["errors"]
    assert all(errors.values()), {k: v for k, v in errors.items() if not v}
    assert "num_samples must be >= 1" in errors["num_samples_0"]
    for name in ("temperature_0", "temperature_nan"):
        assert "temperature must be a finite number > 0" in errors[name], errors[name]
    for name in ("label_2", "label_minus_2"):
        assert "label must be -1 (unconditional), 0 (NC) or 1 (AD)" in errors[name], errors[name]
    for name in ("num_samples_float", "label_int64"):
        assert "int32" in errors[name], errors[name]
    assert "Shape of tensor seed" in errors["seed_rank_1"]
    assert "Shape of tensor temperature" in errors["temperature_rank_1"]


def test_saved_model_cli_runs_the_vqvae(jobs, reference):
    jobs["saved_model_cli"].ok()
    out = reference["work"] / "cli_out"
    np.testing.assert_allclose(
        np.load(out / "reconstruction.npy"), reference["reconstruction"], atol=1e-5
    )
    np.testing.assert_array_equal(np.load(out / "codes.npy"), reference["codes"])


def read_c_tensor(path: Path) -> np.ndarray:
    data = path.read_bytes()
    rank = int(np.frombuffer(data[:8], np.int64)[0])
    dims = np.frombuffer(data[8 : 8 + 8 * rank], np.int64)
    dtype = int(np.frombuffer(data[8 + 8 * rank : 12 + 8 * rank], np.int32)[0])
    assert dtype == 3  # TF_INT32
    return np.frombuffer(data[12 + 8 * rank :], np.int32).reshape(dims)


def test_c_api_loads_both_exports_like_tf_serving(jobs, reference):
    """`TF_LoadSessionFromSavedModel` with tag "serve" (TF Serving's loader) loads both models,
    and a session run of the generator's `sample` signature draws the same codes."""
    from tensorflow.core.protobuf import meta_graph_pb2

    work = reference["work"]
    for name, expected in (
        ("c_vqvae", {"serving_default", "encode", "decode"}),
        ("c_generator", {"serving_default", "sample", "sample_patient"}),
    ):
        jobs[name].ok()
        meta = meta_graph_pb2.MetaGraphDef()
        meta.ParseFromString((work / f"{name}.pb").read_bytes())
        signatures = set(meta.signature_def) - {"__saved_model_init_op"}
        print(f"{name}: signatures {sorted(signatures)}")
        assert signatures == expected
        assert "serve" in meta.meta_info_def.tags
    np.testing.assert_array_equal(read_c_tensor(work / "c_codes.bin"), reference["sampled"][0])


def test_an_attention_prior_exports_a_generator_that_draws_the_codes_of_sample_codes(
    quick_run, tmp_path
):
    """Issue 14: a prior with causal self-attention (`prior.attention_every`; random weights,
    the quick run's K and code map) is sampled inside the generator SavedModel with its
    attention caches, code for code as `sample_codes` draws in memory."""
    import tensorflow as tf
    from conftest import ARCHITECTURES, random_prior

    from keras_vqpix.export import generator_archive
    from keras_vqpix.run_folder import load_vqvae
    from keras_vqpix.sampling import sample_codes

    vqvae, config, _ = load_vqvae(quick_run)
    code_shape = (config.code_size, config.code_size)
    architecture = {**ARCHITECTURES["attention"], "num_embeddings": vqvae.num_embeddings}
    prior = random_prior(code_shape, **architecture)
    generator_archive(vqvae, prior, code_shape).write_out(str(tmp_path / "1"), verbose=False)
    sample = tf.saved_model.load(str(tmp_path / "1")).signatures["sample"]
    for num_samples, seed, label, temperature in ((3, 4, 1, 1.0), (2, 9, -1, 0.8)):
        codes = sample(
            num_samples=tf.constant(num_samples),
            seed=tf.constant(seed),
            label=tf.constant(label),
            temperature=tf.constant(temperature),
        )["codes"].numpy()
        expected = sample_codes(prior, num_samples, seed, label, temperature)
        np.testing.assert_array_equal(codes, expected)
        assert len(np.unique(codes)) > 3


def test_the_generator_draws_noisy_images_of_its_levels_per_class_and_patient(
    quick_run, quick_prior, tmp_path
):
    """`noisy_images`: the images with Rician noise of the level of a training slice of the
    requested class (known levels here: NC 0.02, AD 0.08), one level per patient, seeded."""
    import tensorflow as tf

    from keras_vqpix.export import generator_archive
    from keras_vqpix.noise import NoiseLevels
    from keras_vqpix.run_folder import load_vqvae

    vqvae, config, _ = load_vqvae(quick_run)
    code_shape = (config.code_size, config.code_size)
    levels = NoiseLevels((0.02, 0.08), (0.01, 0.01), (0, 1))
    archive = generator_archive(vqvae, quick_prior, code_shape, noise_levels=levels)
    archive.write_out(str(tmp_path / "1"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "1")).signatures

    def roughness(outputs):
        images, noisy = outputs["images"].numpy(), outputs["noisy_images"].numpy()
        assert noisy.shape == images.shape and noisy.min() >= 0 and noisy.max() <= 1
        bright = images > 0.3
        assert bright.mean() > 0.1
        return [float(np.std((n - i)[b])) for n, i, b in zip(noisy, images, bright, strict=True)]

    inputs = {"seed": tf.constant(3), "temperature": tf.constant(1.0)}
    for label, level in ((0, 0.02), (1, 0.08)):
        drawn = loaded["sample"](num_samples=tf.constant(3), label=tf.constant(label), **inputs)
        assert roughness(drawn) == pytest.approx([level] * 3, rel=0.2)
    again = loaded["sample"](num_samples=tf.constant(3), label=tf.constant(1), **inputs)
    np.testing.assert_array_equal(again["noisy_images"], drawn["noisy_images"])
    # A patient of either class (label -1) gets one level on every slice.
    for seed in range(3):
        patient = loaded["sample_patient"](
            num_slices=tf.constant(3),
            label=tf.constant(-1),
            seed=tf.constant(seed),
            temperature=tf.constant(1.0),
        )
        spread = roughness(patient)
        assert max(spread) / min(spread) < 1.5 and min(spread) > 0.015
