"""A catalogue of bad inputs, each through the real CLI (a subprocess), as a user meets it.

Every case asserts the promise of the README: exit status 2, exactly one
``edgeqat: error:`` line that names the culprit, no traceback, and the disk exactly as it
was: the user's files intact, no output, temp, checkpoint or lock file left behind.
``CATALOGUE`` is the list the README counts; each entry is (id, files, args, fragment):
``files`` are written into an empty directory first (the run's working directory), and
``args`` are the CLI flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TINY_PIPELINE

NPZ = '[data]\nname = "npz"\npath = "d.npz"\n[model]\nepochs = 1\n'
OK_PIPE = TINY_PIPELINE


def _npz(**arrays) -> bytes:
    """An .npz (bytes) with digits-like defaults for the arrays not given."""
    import io

    base = {"x_train": np.random.default_rng(0).random((40, 8, 8, 1), np.float32),
            "y_train": np.arange(40) % 10, "x_test": np.zeros((10, 8, 8, 1), np.float32),
            "y_test": np.arange(10)}
    base.update(arrays)
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in base.items() if v is not None})
    return buf.getvalue()


def _with_nan(where: str, index: int) -> bytes:
    x = np.zeros((40 if where == "x_train" else 10, 8, 8, 1), np.float32)
    x[index, 3, 3, 0] = np.nan if where == "x_train" else np.inf
    return _npz(**{where: x})


def _pickled() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros((1, 2)), y_test=np.zeros(1))
    return buf.getvalue()


def _keras3_file() -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.11.3"}))
        z.writestr("config.json", json.dumps({"class_name": "MyNet", "config": {},
                                              "module": "my_models"}))
        z.writestr("model.weights.h5", b"")
    return buf.getvalue()


def pipe(text: str) -> dict:
    return {"p.toml": 'name = "bad"\n' + text}


def dev(text: str) -> dict:
    return {"p.toml": OK_PIPE, "d.toml": 'name = "d"\n' + text}


DEV = ["--pipeline", "p.toml", "--device", "d.toml"]
TEXT = '[data]\nname = "text"\npath = "corpus.txt"\n'
TEXT_BODY = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(400))


def _lm_state(context: int) -> bytes:
    """An lm_float.npz-like state (what a text run writes) with this context."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **{"param/emb": np.zeros((256, 128), np.float32),
                     "param/pos": np.zeros((context, 128), np.float32),
                     "param/0.wq": np.zeros((128, 128), np.float32),
                     "param/1.wq": np.zeros((128, 128), np.float32)})
    return buf.getvalue()
P = ["--pipeline", "p.toml"]
BUILDERS = '''
import tf_keras as keras
def raises(input_shape, num_classes):
    raise ValueError("width must be even")
def one_arg(input_shape):
    return None
def not_a_model(input_shape, num_classes):
    return "a string"
'''

CATALOGUE = [
    # ---- the pipeline file itself
    ("pipeline-missing", {}, ["--pipeline", "nope.toml"], "nope.toml: pipeline file not found"),
    ("pipeline-is-directory", {"cfg/x.txt": "x"}, ["--pipeline", "cfg"], "cfg: is a directory"),
    ("pipeline-malformed", {"p.toml": "name = [\n"}, P, "p.toml: malformed TOML"),
    ("pipeline-not-utf8", {"p.toml": b"name = '\xff\xfe'\n"}, P, "p.toml: not a UTF-8 TOML"),
    ("unknown-top-key", pipe("colour = 'red'\n"), P, "unknown key 'colour'"),
    ("unknown-nested-key", pipe("[qat]\nepochz = 3\n"), P, "unknown key 'qat.epochz'"),
    ("string-for-int", pipe("seed = 'one'\n"), P, "seed = 'one' must be an integer"),
    ("float-for-int", pipe("[qat]\nepochs = 1.5\n"), P, "qat.epochs = 1.5 must be an integer"),
    ("bool-for-int", pipe("[model]\nbatch_size = true\n"), P, "model.batch_size = True"),
    ("scalar-for-table", pipe("data = 3\n"), P, "[data] must be a table"),
    ("scalar-for-rules", pipe("[policy]\nrules = 3\n"), P, "policy.rules must be a list"),
    ("unknown-dataset", pipe("[data]\nname = 'cifar'\n"), P, "data.name = 'cifar' is not one"),
    ("npz-without-path", pipe("[data]\nname = 'npz'\n"), P, "data.path is required"),
    ("qat-lr-nan", pipe("[qat]\nlearning_rate = nan\n"), P, "qat.learning_rate = nan must be"),
    ("qat-lr-negative", pipe("[qat]\nlearning_rate = -0.01\n"), P,
     "qat.learning_rate = -0.01 must be positive"),
    ("float-lr-negative", pipe("[model]\nlearning_rate = -0.01\n"), P,
     "model.learning_rate = -0.01 must be positive"),
    ("float-lr-inf", pipe("[model]\nlearning_rate = inf\n"), P, "model.learning_rate = inf"),
    ("lr-fraction-zero", pipe("[qat]\nlearning_rate_fraction = 0\n"), P,
     "qat.learning_rate_fraction = 0.0 must be positive"),
    ("eval-samples-negative", pipe("[data]\neval_samples = -20\n"), P,
     "data.eval_samples = -20 must be 0 or more"),
    ("calibration-zero", pipe("[data]\ncalibration_samples = 0\n"), P,
     "data.calibration_samples = 0 must be at least 1"),
    ("validation-fraction-one", pipe("[data]\nvalidation_fraction = 1.0\n"), P,
     "data.validation_fraction = 1.0 must be in [0, 1)"),
    ("seed-negative", pipe("seed = -1\n"), P, "seed = -1 must be 0..4294967295"),
    ("seed-huge", pipe("seed = 1099511627776\n"), P, "seed = 1099511627776 must be"),
    ("quant-delay-above-one", pipe("[qat]\nquant_delay = 1.5\n"), P,
     "qat.quant_delay = 1.5 must be a fraction"),
    ("temperature-zero", pipe("[qat]\ndistill_temperature = 0\n"), P,
     "qat.distill_temperature = 0.0 must be positive"),
    ("batch-zero", pipe("[model]\nbatch_size = 0\n"), P, "model.batch_size = 0 must be at least"),
    ("budget-above-one", pipe("[validate]\nmax_accuracy_drop = 2\n"), P,
     "validate.max_accuracy_drop = 2.0 must be a fraction"),
    ("latency-runs-zero", pipe("[validate]\nlatency_runs = 0\n"), P,
     "validate.latency_runs = 0 must be at least 1"),
    ("percentile-low", pipe("[ptq]\npercentile = 40\n"), P, "ptq.percentile = 40.0 must be in"),
    ("weight-bits-one", pipe("[policy.default]\nweight_bits = 1\n"), P,
     "policy.default.weight_bits = 1 must be 2..8"),
    ("weight-bits-nine", pipe("[[policy.rules]]\nweight_bits = 9\n"), P,
     "policy.rules[0].weight_bits = 9 must be 2..8"),
    ("int8-with-16-bit-activations", pipe("[policy.default]\nactivation_bits = 16\n"), P,
     "policy.default.activation_bits = 16 but convert.mode = 'int8'"),
    ("int16x8-with-8-bit-activations", pipe("[convert]\nmode = 'int16x8'\n"), P,
     "policy.default.activation_bits = 8 but convert.mode = 'int16x8'"),
    ("int4-with-3-bit-weights",
     pipe("[convert]\nmode = 'int4_weights'\n[policy.default]\nweight_bits = 3\n"), P,
     "policy.default.weight_bits = 3 but convert.mode = 'int4_weights' cannot ship"),
    ("int8-with-3-bit-weights", pipe("[[policy.rules]]\nclasses = 'DepthwiseConv2D'\n"
                                     "weight_bits = 3\n"), P,
     "policy.rules[0].weight_bits = 3 but convert.mode = 'int8' cannot ship fewer than 4"),
    ("precision-step-2-bit", pipe("[[qat.precision]]\nweight_bits = 2\n"), P,
     "qat.precision[0].weight_bits = 2 but convert.mode = 'int8' ships 4..8-bit"),
    ("bad-regex", pipe("[[policy.rules]]\nlayers = '('\n"), P,
     "policy.rules[0].layers is not a valid regex"),
    ("unknown-weight-quantizer", pipe("[policy.default]\nweight_quantizer = 'magic'\n"), P,
     "policy.default.weight_quantizer = 'magic' is not one of"),
    ("unknown-convert-mode", pipe("[convert]\nmode = 'int2'\n"), P, "convert.mode = 'int2'"),
    ("precision-epochs-unordered",
     pipe("[[qat.precision]]\nepoch = 2\n[[qat.precision]]\nepoch = 1\n"), P,
     "qat.precision = [2, 1] epochs must be distinct"),
    ("precision-bits-one", pipe("[[qat.precision]]\nweight_bits = 1\n"), P,
     "qat.precision[0].weight_bits = 1 must be 2..8"),
    ("unknown-strategy", pipe("[qat]\nstrategy = 'tpu'\n"), P, "qat.strategy = 'tpu' is not"),
    # ---- command-line flags (the same checks as the file)
    ("flag-epochs-negative", {"p.toml": OK_PIPE}, P + ["--epochs", "-1"],
     "qat.epochs = -1 must be 0 or more (set on the command line)"),
    ("flag-float-epochs-negative", {"p.toml": OK_PIPE}, P + ["--float_epochs", "-3"],
     "model.epochs = -3 must be 0 or more (set on the command line)"),
    ("flag-seed-negative", {"p.toml": OK_PIPE}, P + ["--seed", "-5"],
     "seed = -5 must be 0..4294967295 (set on the command line)"),
    ("flag-unknown", {}, ["--epoch", "3"], "Unknown command line flag 'epoch'"),
    ("flag-not-an-integer", {}, ["--epochs", "abc"], "--epochs"),
    ("stray-argument", {}, ["stray"], "unexpected argument 'stray'"),
    ("device-missing", {"p.toml": OK_PIPE}, P + ["--device", "nodev.toml"],
     "nodev.toml: device file not found"),
    ("device-is-directory", {"p.toml": OK_PIPE, "devs/a.txt": "x"}, P + ["--device", "devs"],
     "devs: is a directory"),
    # ---- the device profile
    ("device-unknown-runtime", dev("runtime = 'onnx'\n"), DEV, "runtime = 'onnx' is not one"),
    ("device-ssh-no-host", dev("[connection]\nkind = 'ssh'\n"), DEV,
     "connection.host is required"),
    ("device-port-too-big", dev("[connection]\nkind = 'ssh'\nhost = 'pi'\nport = 70000\n"), DEV,
     "connection.port = 70000 must be 1..65535"),
    ("device-port-zero", dev("[connection]\nkind = 'ssh'\nhost = 'pi'\nport = 0\n"), DEV,
     "connection.port = 0 must be 1..65535"),
    ("device-threads-zero", dev("num_threads = 0\n"), DEV, "num_threads = 0 must be 1..1024"),
    ("device-delegate-device", dev("delegate_device = 'usb'\n"), DEV,
     "delegate_device applies only to delegate = 'edgetpu'"),
    ("device-retries-negative", dev("[connection]\nretries = -1\n"), DEV,
     "connection.retries = -1 must be 0 or more"),
    ("device-timeout-nan", dev("[connection]\ntimeout_s = nan\n"), DEV,
     "connection.timeout_s = nan must be a finite number"),
    ("device-ssh-option", dev("[connection]\nkind = 'ssh'\nhost = 'h'\nssh_options = ['-v']\n"),
     DEV, "connection.ssh_options = '-v' must look like 'Key=Value'"),
    # ---- the output path (checked before any training)
    ("output-is-a-file", {"p.toml": OK_PIPE, "out": "my notes"}, P + ["--output_dir", "out"],
     "out: exists and is not a directory edgeqat made"),
    ("output-has-user-files", {"p.toml": OK_PIPE, "out/thesis.tex": "precious"},
     P + ["--output_dir", "out"], "out: holds files edgeqat did not write"),
    ("output-under-a-file", {"p.toml": OK_PIPE, "f": "x"}, P + ["--output_dir", "f/out"],
     "f is a file, not a directory"),
    ("output-not-creatable", {"p.toml": OK_PIPE}, P + ["--output_dir", "/proc/edgeqat-out"],
     "/proc/edgeqat-out: cannot write in /proc"),
    ("checkpoint-dir-has-user-files",
     {"p.toml": OK_PIPE.replace("[qat]\n", "[qat]\ncheckpoint_dir = 'ck'\n"), "ck/a.txt": "x"},
     P + ["--output_dir", "out"], "ck: qat.checkpoint_dir holds files that are not an edgeqat"),
    # ---- data (checked before TensorFlow loads)
    ("npz-missing", pipe(NPZ), P, "d.npz: data file not found"),
    ("npz-is-text", {**pipe(NPZ), "d.npz": "a,b\n1,2\n"}, P, "d.npz: not a .npz file"),
    ("npz-missing-arrays", {**pipe(NPZ), "d.npz": _npz(y_test=None)}, P,
     "d.npz: missing array(s) y_test"),
    ("npz-pickled", {**pipe(NPZ), "d.npz": _pickled()}, P,
     "d.npz: holds Python objects"),
    ("npz-strings", {**pipe(NPZ), "d.npz": _npz(x_train=np.array([["a", "b"]] * 40))},
     P, "d.npz: x_train has dtype <U1"),
    ("npz-empty-train", {**pipe(NPZ), "d.npz": _npz(
        x_train=np.zeros((0, 8, 8, 1), np.float32), y_train=np.zeros(0))}, P,
     "d.npz: x_train is empty"),
    ("npz-nan-input", {**pipe(NPZ), "d.npz": _with_nan("x_train", 7)}, P,
     "d.npz: x_train[7] holds NaN or infinity"),
    ("npz-inf-input", {**pipe(NPZ), "d.npz": _with_nan("x_test", 3)}, P,
     "d.npz: x_test[3] holds NaN or infinity"),
    ("npz-fractional-label", {**pipe(NPZ), "d.npz": _npz(
        y_train=np.r_[np.zeros(5), 1.5, np.zeros(34)])}, P, "d.npz: y_train[5] = 1.5 is not a"),
    ("npz-negative-label", {**pipe(NPZ), "d.npz": _npz(
        y_test=np.r_[0, 1, -1, np.zeros(7, int)])}, P, "d.npz: y_test[2] = -1 is negative"),
    ("npz-one-hot-labels", {**pipe(NPZ), "d.npz": _npz(y_train=np.eye(10)[
        np.arange(40) % 10])}, P, "d.npz: y_train has shape (40, 10); labels are class"),
    ("npz-length-mismatch", {**pipe(NPZ), "d.npz": _npz(y_train=np.zeros(39))}, P,
     "d.npz: x_train has 40 samples but y_train has 39"),
    ("npz-shape-mismatch", {**pipe(NPZ), "d.npz": _npz(
        x_test=np.zeros((10, 4, 4, 1), np.float32))}, P, "d.npz: x_train samples have shape"),
    ("npz-one-dimensional", {**pipe(NPZ), "d.npz": _npz(
        x_train=np.zeros(40, np.float32))}, P, "d.npz: x_train has shape (40,)"),
    ("no-training-left", {**pipe(NPZ.replace(
        "path = \"d.npz\"\n", "path = \"d.npz\"\nvalidation_fraction = 0.99\n")),
        "d.npz": _npz(x_train=np.zeros((1, 8, 8, 1), np.float32), y_train=np.zeros(1))}, P,
     "leaves no training samples"),
    # ---- the device, before any training
    ("qemu-no-sysroot", dev("[connection]\nkind = 'qemu'\nsysroot = 'nowhere'\n"), DEV,
     "no aarch64 sysroot at"),
    ("adb-not-installed", dev("[connection]\nkind = 'adb'\nadb = 'adb-not-installed'\n"), DEV,
     "adb-not-installed not found on PATH"),
    ("ssh-nothing-listening", dev("[connection]\nkind = 'ssh'\nhost = '127.0.0.1'\nport = {port}\n"
                                  "retries = 0\nconnect_timeout_s = 5\n"), DEV,
     "(ssh 127.0.0.1): open a session failed"),
    ("edgetpu-missing", dev("delegate = 'edgetpu'\n"), DEV, "libedgetpu"),
    # ---- the model (TensorFlow loads first)
    ("builder-unknown", pipe("[model]\nbuilder = 'resnet9000'\n"), P,
     "model.builder = 'resnet9000' is unknown"),
    ("builder-module-missing", pipe("[model]\nbuilder = 'no_such_pkg:build'\n"), P,
     "model.builder = 'no_such_pkg:build': cannot import no_such_pkg"),
    ("builder-raises", {**pipe("[model]\nbuilder = 'mybuild:raises'\n"), "mybuild.py": BUILDERS},
     P, "model.builder = 'mybuild:raises' raised ValueError: width must be even"),
    ("builder-wrong-signature",
     {**pipe("[model]\nbuilder = 'mybuild:one_arg'\n"), "mybuild.py": BUILDERS}, P,
     "one_arg(input_shape) cannot be called as build(input_shape, num_classes)"),
    ("builder-not-a-model",
     {**pipe("[model]\nbuilder = 'mybuild:not_a_model'\n"), "mybuild.py": BUILDERS}, P,
     "returned a model that is a str"),
    ("model-file-missing", pipe("[model]\npath = 'm.keras'\n"), P, "m.keras: model file not found"),
    ("model-file-not-a-model", {**pipe("[model]\npath = 'm.h5'\n"), "m.h5": "not HDF5"}, P,
     "m.h5: not a loadable Keras model"),
    ("model-file-keras3-subclassed",
     {**pipe("[model]\npath = 'm.keras'\n"), "m.keras": _keras3_file()}, P,
     "a Keras 3 MyNet model; edgeqat imports Sequential and Functional models only"),
    ("model-input-shape", {**pipe("[model]\npath = 'm4.keras'\n"), "m4.keras": "@model:4:10"}, P,
     "takes inputs of shape (4) but the digits samples have shape (8, 8, 1)"),
    ("labels-beyond-outputs", {**pipe("[model]\npath = 'm3.keras'\n"), "m3.keras": "@model:64:3"},
     P, "has 3 outputs (labels 0..2)"),
    # ---- the language-model pipeline (data.name = "text")
    ("text-empty-corpus", {**pipe(TEXT), "corpus.txt": ""}, P,
     "corpus.txt: the text is empty"),
    ("text-empty-folder", {**pipe(TEXT.replace("corpus.txt", "docs")), "docs/a.bin": b"x"},
     P, "docs: no text files"),
    ("text-not-utf8", {**pipe(TEXT), "corpus.txt": b"def f():\n    return '\xff\xfe'\n"},
     P, "corpus.txt: not UTF-8 text (byte 21"),
    ("text-not-utf8-in-folder", {**pipe(TEXT.replace("corpus.txt", "docs")),
                                 "docs/a.txt": "fine\n" * 50, "docs/b.py": b"\x80abc"},
     P, "b.py: not UTF-8 text (byte 0"),
    ("text-too-small-for-window", {**pipe(TEXT + "[lm]\ncontext = 512\n"),
                                   "corpus.txt": "tiny text " * 100},
     P, "split has"),
    ("text-window-longer-than-model", {**pipe(TEXT + '[model]\npath = "lm.npz"\n'
                                              "[lm]\ncontext = 64\n"),
                                       "corpus.txt": TEXT_BODY, "lm.npz": _lm_state(32)},
     P, "the model's context is 32 tokens; lm.context = 64 is longer"),
    ("text-model-not-a-state", {**pipe(TEXT + '[model]\npath = "lm.npz"\n'),
                                "corpus.txt": TEXT_BODY, "lm.npz": _npz()},
     P, "no 'param/emb'"),
    ("text-prompt-empty", pipe(TEXT + '[lm]\nprompt = ""\n'), P,
     "lm.prompt = '' has no tokens"),
    ("text-prompt-too-long", pipe(TEXT + "[lm]\ncontext = 8\nprompt = 'abcdefghij'\n"), P,
     "not fewer than lm.context = 8"),
    ("text-heads-do-not-divide", pipe(TEXT + "[lm]\ndim = 30\nheads = 4\n"), P,
     "lm.heads = 4 must divide lm.dim = 30"),
    ("text-int16x8-int4-head", pipe(TEXT + '[lm]\nhead_bits = 4\n[convert]\n'
                                    'mode = "int16x8"\n'), P,
     "lm.head_bits = 4 but convert.mode = 'int16x8'"),

]
assert len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if "__pycache__" in rel:
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _saved_model(path: Path, spec: str) -> None:
    """``@model:IN:OUT``: a tf_keras .keras model, IN flat features (or 8x8x1 for 64)."""
    from edgeqat.keras import keras

    _, n_in, n_out = spec.split(":")
    shape = (8, 8, 1) if n_in == "64" else (int(n_in),)
    i = keras.Input(shape)
    x = keras.layers.Flatten()(i)
    keras.Model(i, keras.layers.Dense(int(n_out))(x)).save(path)


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: float = 300):
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "edgeqat.pipeline", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(p, fragment: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("edgeqat: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def lock_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("locks")


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_and_leaves_the_disk_as_it_was(case, tmp_path, lock_dir):
    from tests.harness_support import free_port

    name, files, args, fragment = case
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    for rel, content in files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("@model:"):
            _saved_model(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{port}", str(port)))
    before = _snapshot(work)
    p = run_cli(args, work, {"EDGEQAT_LOCK_DIR": str(lock_dir)})
    assert_one_line_error(p, fragment)
    assert _snapshot(work) == before  # the user's files intact, nothing new left


def test_the_catalogue_is_large_enough_and_the_readme_counts_it():
    assert len(CATALOGUE) >= 60
    assert f"a catalogue of {len(CATALOGUE)} bad inputs" in (ROOT / "README.md").read_text()
