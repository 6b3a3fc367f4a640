"""Acceptance: an int8 model on an emulated Raspberry Pi 4 (aarch64 Cortex-A72 under QEMU)
gives the host's accuracy and the host's outputs.

The fixture builds the sysroot on first use (``python -m edgeqat.harness.qemu setup`` does
the same) and reuses the cache afterwards. It skips, saying why, only when qemu or the
downloads are unavailable; CI sets EDGEQAT_REQUIRE_DEVICE_TESTS=1 so that a skip fails.
"""

from __future__ import annotations

import pytest

from edgeqat import export
from edgeqat.config import DEVICES_DIR, load_device
from edgeqat.harness import qemu
from edgeqat.harness.compare import compare_runs
from edgeqat.harness.device import run_on_device
from tests.harness_support import build_int8_model, emulated_sysroot

pytestmark = [pytest.mark.device, pytest.mark.slow]


@pytest.fixture(scope="module")
def sysroot():
    return emulated_sysroot()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_int8_model(tmp_path_factory.mktemp("model"))


def test_setup_is_cached(sysroot):
    assert qemu.is_ready(sysroot)
    lines = []
    assert qemu.setup(sysroot, log=lines.append) == sysroot
    assert lines == [f"sysroot {sysroot} is ready (cached)"]
    assert (sysroot / "proc" / "cpuinfo").read_text().count("CPU part\t: 0xd08") == 4


def test_int8_model_on_emulated_rpi4_matches_the_host(sysroot, model):
    emulated = load_device(DEVICES_DIR / "rpi4_emulated.toml")
    host = load_device(DEVICES_DIR / "local_cpu.toml")
    models = {"digits_int8": model.path}
    pi = run_on_device(emulated, models, model.x, model.y, warmup=1, runs=3)["digits_int8"]
    ref = run_on_device(host, models, model.x, model.y, warmup=1, runs=3)["digits_int8"]

    assert pi.info["cpu"]["machine"] == "aarch64"
    assert pi.info["cpu"]["cpu_part"] == "0xd08"  # Cortex-A72
    assert pi.info["runtime"] == "ai_edge_litert" and pi.delegate_applied == "xnnpack"
    assert pi.info["num_threads"] == 4
    assert pi.info["model_sha256"] == ref.info["model_sha256"]
    assert pi.accuracy == ref.accuracy
    cmp = compare_runs(ref, pi)
    assert cmp.top1_agreement == 1.0
    assert cmp.max_abs_steps == 0, cmp  # with QEMU_CPU=cortex-a72, int8 is bit-exact
    print(f"\nemulated rpi4 accuracy {pi.accuracy:.4f}, host {ref.accuracy:.4f}, "
          f"{cmp.samples} samples, max diff {cmp.max_abs_steps} steps")


def test_missing_sysroot_is_a_clear_error(tmp_path, model):
    import dataclasses

    device = load_device(DEVICES_DIR / "rpi4_emulated.toml")
    device = dataclasses.replace(device, connection=dataclasses.replace(
        device.connection, sysroot=str(tmp_path / "none")))
    with pytest.raises(qemu.QemuError, match="python -m edgeqat.harness.qemu setup"):
        run_on_device(device, {"m": model.path}, model.x[:2])


def test_int4_kernels_round_per_cpu_and_keras_follows_each(sysroot, tmp_path):
    """The int4 CONV_2D kernels round twice on x86_64; on the emulated Cortex-A72 once,
    except for an output with one spatial position (the dense layer here, a 1x1 conv on
    1x1), which rounds twice. ``requant.install(model, mode, arch)`` makes Keras
    reproduce each CPU bit for bit.

    Convolutions only: on the emulated Pi, MEAN after an int4 layer also differs from
    Keras by one step on ~0.5% of outputs (not emulated; docs/int4.md)."""
    import numpy as np

    from edgeqat import annotate, convert, policy, requant
    from edgeqat.keras import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = np.random.default_rng(0).normal(size=(48, 8, 8, 2)).astype(np.float32)
    h = keras.layers.Flatten()(keras.layers.Conv2D(8, 1)(h))
    qat = annotate.annotate_model(keras.Model(inp, keras.layers.Dense(6)(h)),
                                  policy.uniform(weight_bits=4, weight_quantizer="lsq"),
                                  sample_x=x)
    qat(x, training=True)
    export.prepare_for_export(qat, "int4_weights")
    path = tmp_path / "int4.tflite"
    path.write_bytes(convert.to_tflite(qat, "int4_weights", qat=True))
    runs = {arch: run_on_device(load_device(DEVICES_DIR / profile), {"m": path}, x,
                                warmup=0, runs=1)["m"]
            for arch, profile in (("aarch64", "rpi4_emulated.toml"),
                                  (requant.host_arch(), "local_cpu.toml"))}
    for arch, run in runs.items():
        requant.install(qat, "int4_weights", arch)
        steps = np.abs(qat.predict(x, verbose=0) - run.outputs) / run.info["outputs"][0]["scale"]
        assert steps.max() < 1e-3, (arch, steps.max())  # bit-exact on each CPU
    if requant.host_arch() == "x86_64":
        assert compare_runs(runs["x86_64"], runs["aarch64"]).max_abs_steps >= 1


PI_BATCH_MATMUL = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
work = sys.argv[1]
for n in range(int(sys.argv[2])):
    it = Interpreter(model_path=f"{work}/m{n}.tflite", num_threads=1)
    it.allocate_tensors()
    inputs = np.load(f"{work}/in{n}.npz")
    for j, d in enumerate(it.get_input_details()):
        it.set_tensor(d["index"], inputs[f"x{j}"])
    it.invoke()
    np.save(f"{work}/out{n}.npy", it.get_tensor(it.get_output_details()[0]["index"]))
"""


def test_int8_batch_matmul_rounds_on_the_pi_as_requant_says(sysroot, tmp_path):
    """The emulated Cortex-A72 runs int8 BATCH_MATMUL as x86_64 does (XNNPACK's float32
    rounding where the right operand's zero point is 0, gemmlowp's two roundings
    elsewhere): ``requant.integer_matmul`` with ``batch_matmul_rule("aarch64", ...)``
    gives its outputs bit for bit."""
    import subprocess

    import numpy as np

    from tests.test_requant import (
        BATCH_MATMUL_CASES,
        batch_matmul_inputs,
        expected_batch_matmul,
        one_batch_matmul,
    )

    cases = []
    for n, (rhs_range, transpose_b) in enumerate(BATCH_MATMUL_CASES):
        flat = one_batch_matmul(rhs_range, transpose_b)
        inputs = batch_matmul_inputs(flat, seed=n)
        (tmp_path / f"m{n}.tflite").write_bytes(flat)
        np.savez(tmp_path / f"in{n}.npz", **{f"x{j}": x for j, x in enumerate(inputs)})
        cases.append((flat, inputs, transpose_b))
    (tmp_path / "run.py").write_text(PI_BATCH_MATMUL)
    p = subprocess.run(qemu.command(sysroot, [str(tmp_path / "run.py"), str(tmp_path),
                                              str(len(cases))]),
                       env=qemu.environment(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    zeros = set()
    for n, (flat, inputs, transpose_b) in enumerate(cases):
        want, rhs_zero = expected_batch_matmul(flat, inputs, transpose_b, "aarch64")
        np.testing.assert_array_equal(want, np.load(tmp_path / f"out{n}.npy"))
        zeros.add(rhs_zero == 0)
    assert zeros == {True, False}  # both kernels were exercised
