"""The language-model pipeline, tiny: the real CLI, converter, LiteRT and runner.

One small text pipeline (1 layer, dim 32, context 32, on the built-in corpus) runs through
``python -m edgeqat.pipeline`` once per module; the tests read what it wrote. Figures the
issue asks of every run are asserted on what it trained: both signatures fully integer,
Keras QAT vs TFLite agreement, decode vs prefill.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeqat.lm import evaluate, text
from tests.conftest import ROOT
from tests.test_bad_inputs import assert_one_line_error, run_cli

# The tests reading the tiny run share one worker, so the run is made once (xdist
# loadgroup), not once per worker.
GROUP = pytest.mark.xdist_group("tiny_lm")

TINY_LM = """
name = "tiny_lm"
seed = 0
[data]
name = "text"
[lm]
context = 32
dim = 32
layers = 1
heads = 2
steps = 120
batch_size = 32
qat_steps = 20
eval_windows = 12
decode_windows = 2
generate_tokens = 12
max_perplexity_increase = 0.05
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("lm")
    (work / "tiny_lm.toml").write_text(TINY_LM)
    p = run_cli(["--pipeline", "tiny_lm.toml", "--output_dir", "out"], work, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return work / "out", p


@GROUP
def test_the_run_writes_every_model_the_states_and_the_report(tiny_run):
    out, p = tiny_run
    names = {f.name for f in out.iterdir()}
    assert {"float.tflite", "dynamic_int8.tflite", "ptq_w8a8.tflite", "qat_w8a8.tflite",
            "lm_float.npz", "lm_qat.npz", "report.json", "report.md", "report.html",
            "pipeline.toml", "device.toml", ".edgeqat-run"} <= names
    assert "perplexity: float" in p.stdout
    md = (out / "report.md").read_text()
    assert "| QAT W8A8 |" in md and "## Generated" in md
    assert "<img" in (out / "report.html").read_text()
    assert not list(out.parent.glob("out.ckpt*"))  # no checkpoint left


@GROUP
def test_both_signatures_are_fully_integer_with_the_cache_as_int8(tiny_run):
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import inspect

    out, _ = tiny_run
    model = (out / "qat_w8a8.tflite").read_bytes()
    ops = inspect.require_full_integer_everywhere(model, "qat")
    assert set(ops) == {"prefill", "decode"}
    it = Interpreter(model_content=model)
    decode = it.get_signature_runner("decode")
    ins = decode.get_input_details()
    assert ins["tokens"]["dtype"] == np.int32 and ins["input_pos"]["dtype"] == np.int32
    assert ins["kv_cache_k_0"]["dtype"] == np.int8
    assert list(ins["kv_cache_v_0"]["shape"]) == [1, 2, 32, 16]
    outs = decode.get_output_details()
    assert outs["logits"]["dtype"] == np.int8 and outs["kv_cache_k_0"]["dtype"] == np.int8
    # The decode cache output uses the input's scale: the loop feeds it back unchanged.
    assert outs["kv_cache_k_0"]["quantization"] == ins["kv_cache_k_0"]["quantization"]
    report = json.loads((out / "report.json").read_text())
    assert report["signatures"] == ["decode", "prefill"]
    assert "L2_NORMALIZATION" in report["full_integer"]["prefill"]


@GROUP
def test_keras_qat_and_tflite_agree_and_decode_matches_prefill(tiny_run):
    out, _ = tiny_run
    r = json.loads((out / "report.json").read_text())
    kt = r["fidelity"]["keras_vs_tflite"]
    assert kt["top1_agreement"] >= 0.99, kt
    assert kt["logits_within"] >= 0.99, kt
    dv = r["fidelity"]["decode_vs_prefill"]
    assert dv["positions_within"] >= 0.999, dv
    rows = {row["name"]: row for row in r["rows"]}
    assert list(rows) == ["float", "dynamic_int8", "ptq_w8a8", "qat_w8a8"]
    for row in rows.values():
        assert np.isfinite(row["perplexity"]) and 1 < row["perplexity"] < 256
        assert row["bits_per_byte"] == pytest.approx(np.log2(row["perplexity"]))
        assert set(row["speed"]) == {"1", "2"}
    # A W8A8 model of this size loses little; the trained model beats a uniform guess.
    assert rows["qat_w8a8"]["perplexity"] < 1.05 * rows["float"]["perplexity"] < 60
    assert rows["qat_w8a8"]["bytes"] < rows["float"]["bytes"]
    assert r["data"]["sha256"] and r["data"]["corpus"] == text.BUILTIN
    assert r["samples"]["prompt"] == "def "


@GROUP
def test_the_runner_generates_from_a_prompt_with_numpy_and_litert(tiny_run):
    out, _ = tiny_run
    runner = ROOT / "edgeqat" / "harness" / "runner.py"
    p = subprocess.run([sys.executable, str(runner), "--model", str(out / "qat_w8a8.tflite"),
                        "--generate", "class ", "--max_new_tokens", "10"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("class ") and len(p.stdout.encode()) > len("class ")
    r = json.loads((out / "report.json").read_text())
    # The pipeline's sample came from the same decode loop on the device.
    assert len(r["samples"]["qat_w8a8"].encode("utf-8", "replace")) >= 1
    empty = subprocess.run([sys.executable, str(runner), "--model",
                            str(out / "qat_w8a8.tflite"), "--generate", ""],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "the prompt has no tokens" in empty.stderr


# ------------------------------------------------------------------ no TensorFlow


def test_text_is_split_by_document_into_windows(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"d{i:02d}.txt").write_text(f"document {i} " * 40)
    data = text.load_text(str(folder), context=15)
    assert data.train.shape[1] == data.test.shape[1] == 16
    assert data.split_documents["test"] == ["d00.txt", "d10.txt"]
    assert data.split_documents["validation"] == ["d05.txt"]
    test_bytes = bytes(data.test.reshape(-1).astype(np.uint8))
    assert b"document 0" in test_bytes and b"document 3" not in test_bytes
    assert text.decode(text.encode("é€")) == "é€"


def test_the_builtin_corpus_is_the_named_stdlib_modules():
    corpus = text.stdlib_corpus()
    assert [n for n, _ in corpus.documents] == [f"{m}.py" for m in text.STDLIB_MODULES]
    assert corpus.size > 1_000_000 and len(corpus.sha256) == 64


def test_scores_agreement_and_gap():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    s = evaluate.scores(logits, targets, logits)
    assert s["top1_agreement"] == 1.0 and abs(s["kl"]) < 1e-9
    uniform = evaluate.scores(np.zeros((1, 3, 256), np.float32), np.zeros((1, 3), int))
    assert uniform["perplexity"] == pytest.approx(256) and uniform["bits_per_byte"] == \
        pytest.approx(8)
    a = np.array([[[0, 5, 1]]], np.int8)
    b = np.array([[[0, 2, 1]]], np.int8)
    got = evaluate.step_agreement(a, b)
    assert got["top1_agreement"] == 1.0 and got["max_steps"] == 3
    assert got["logits_within"] == pytest.approx(2 / 3) and got["positions_within"] == 0
    assert evaluate.gap_recovered(10.0, 12.0, 10.5) == pytest.approx(0.75)
    assert evaluate.gap_recovered(10.0, 10.001, 10.0) is None


def test_w4a8_stores_packed_int4_kernels_and_matches_its_keras_model():
    """W4A8 through the same export: a few float steps, calibrated ranges, least-squares
    clips, no QAT."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import inspect
    from edgeqat.lm import export, flow, train
    from edgeqat.lm.model import LmPrecision, LmShape, TinyLm

    windows = text.load_text(None, 16).train[::50]
    shape = LmShape(context=16, dim=32, layers=1, heads=2)
    float_model = TinyLm(shape)
    train.pretrain(float_model, windows, train.Schedule(40, 32, 3e-3, warmup=4), 0)
    model = train.copy_of(float_model, precision=LmPrecision(weight_bits=4))
    train.calibrate(model, windows, batches=2, batch_size=8)
    tflite = export.to_tflite(model, "full_integer", windows)
    inspect.require_full_integer_everywhere(tflite, "w4a8")
    stored = {t["name"]: t["type"] for t in inspect.tensors(tflite)}
    assert sum(t == "int4" for t in stored.values()) == 6  # Q, K, V, O, up, down
    keras = flow.keras_logits(model, windows[:8], 16)
    prefill = Interpreter(model_content=tflite).get_signature_runner("prefill")
    scale, zero = prefill.get_output_details()["logits"]["quantization"]
    raw = np.stack([prefill(tokens=w[None, :16])["logits"][0] for w in windows[:8]])
    got = evaluate.step_agreement(evaluate.to_steps(keras, scale, zero), raw)
    # The int4 projections and the attention round as the kernels here do (as_exported).
    assert got["logits_within"] >= 0.99 and got["top1_agreement"] >= 0.99, got


def test_w8a16_is_16x8_throughout_and_closer_to_float_than_w8a8():
    """16-bit activations (convert.mode = 'int16x8'): int16 tensors in both signatures
    (logits and cache too), the norm as MUL/MEAN/RSQRT/MUL (TFLite has no int16
    L2_NORMALIZATION), int64 biases stored once, no requantizing op; its logits are closer
    to float than W8A8's and its Keras model's within a small fraction of an int8 step."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import inspect
    from edgeqat.lm import export, flow, train
    from edgeqat.lm.model import LmPrecision, LmShape, TinyLm

    windows = text.load_text(None, 16).train[::50]
    shape = LmShape(context=16, dim=32, layers=1, heads=2)
    float_model = TinyLm(shape)
    train.pretrain(float_model, windows, train.Schedule(40, 32, 3e-3, warmup=4), 0)
    reference = flow.keras_logits(float_model, windows[:8], 16)
    kl = {}
    for bits in (8, 16):
        model = train.copy_of(float_model, precision=LmPrecision(activation_bits=bits))
        train.calibrate(model, windows, batches=2, batch_size=8)
        tflite = export.to_tflite(model, "full_integer", windows)
        ops = inspect.require_full_integer_everywhere(tflite, model.precision.name)
        prefill = Interpreter(model_content=tflite).get_signature_runner("prefill")
        out = prefill.get_output_details()["logits"]
        raw = np.stack([prefill(tokens=w[None, :16])["logits"][0] for w in windows[:8]])
        scale, zero = out["quantization"]
        kl[bits] = evaluate.scores(evaluate.dequantize(raw, scale, zero), windows[:8, 1:17],
                                   reference)["kl"]
        if bits == 8:
            continue
        names = {sig: {o.name for o in o_} for sig, o_ in ops.items()}
        for sig in ("prefill", "decode"):
            assert {"RSQRT", "MEAN", "MUL"} <= names[sig], names[sig]
            assert not names[sig] & {"L2_NORMALIZATION", "QUANTIZE", "DEQUANTIZE"}, names[sig]
        decode = Interpreter(model_content=tflite).get_signature_runner("decode")
        io = {**decode.get_input_details(), **decode.get_output_details()}
        assert out["dtype"] == np.int16 and zero == 0
        assert {io[k]["dtype"] for k in io if k.startswith(("kv_cache", "logits"))} == {np.int16}
        stored = inspect.tensors(tflite)
        biases = [t for t in stored if t["type"] == "int64"]
        assert biases and all(t["bytes"] == 8 * int(np.prod(t["shape"])) for t in biases)
        keras = evaluate.to_steps(flow.keras_logits(model, windows[:8], 16), scale, zero,
                                  "int16")
        got = evaluate.step_agreement(keras, raw, steps=8)
        # 8 steps of this int16 grid are 1/32 of an int8 step of the same range (measured:
        # at most 6; int16 SOFTMAX and RSQRT are table lookups, Keras computes them exactly).
        assert got["logits_within"] >= 0.999 and got["top1_agreement"] >= 0.99, got
    assert kl[16] < kl[8], kl


def test_w8a16_decode_reproduces_prefill_exactly():
    """The decode loop's logits and cache are prefill's, to the int16 step. Prefill's
    position table is a constant (its gather is folded) and decode's a GATHER: both come
    from one table quantized before the gather, or 1-step differences at rounding ties
    (6 of 64 positions on the benchmark's model) carry through every layer."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat.harness.runner import decode_step, empty_cache
    from edgeqat.lm import export, train
    from edgeqat.lm.model import LmPrecision, LmShape, TinyLm

    windows = text.load_text(None, 64).train[::40]
    model = TinyLm(LmShape(context=64, dim=128, layers=1, heads=4),
                   LmPrecision(activation_bits=16))
    train.calibrate(model, windows, batches=2, batch_size=8)
    it = Interpreter(model_content=export.to_tflite(model, "full_integer", windows))
    prefill, decode = it.get_signature_runner("prefill"), it.get_signature_runner("decode")
    tokens = windows[0, :64].astype(np.int32)
    full = prefill(tokens=tokens[None])
    cache = empty_cache(decode)
    for pos, tok in enumerate(tokens):
        logits, cache = decode_step(decode, int(tok), pos, cache)
        np.testing.assert_array_equal(logits, full["logits"][0, pos])
    for name, value in cache.items():
        np.testing.assert_array_equal(value, full[name])


def test_a_runtime_too_old_for_the_16x8_ops_is_refused_before_the_device(tmp_path):
    """W8A16 needs int16 RSQRT (version 3) and CONV_2D version 8, newer than a profile's
    tflite-runtime 2.14: one line naming them, exit 2, no output directory."""
    (tmp_path / "old.toml").write_text('name = "old_runtime"\nruntime = "ai_edge_litert"\n'
                                       'runtime_version = "2.14.0"\n[connection]\n'
                                       'kind = "local"\n')
    (tmp_path / "lm16.toml").write_text(TINY_LM.replace("steps = 120", "steps = 10")
                                        .replace("qat_steps = 20", "qat_steps = 2")
                                        + '[convert]\nmode = "int16x8"\n')
    p = run_cli(["--pipeline", "lm16.toml", "--device", "old.toml", "--output_dir", "out"],
                tmp_path, timeout=600)
    line = assert_one_line_error(p, "cannot load on")
    assert "RSQRT version 3" in line and "2.14.0" in line, line
    assert not (tmp_path / "out").exists()


def test_attention_products_round_as_the_batch_matmul_kernel():
    """Each int8 BATCH_MATMUL of a prefill, fed its own TFLite inputs, is reproduced
    bit for bit by ``requant.integer_matmul`` at the grids the Keras model derives from its
    ranges (``int8_grid``, the converter's nudging), and those grids are the flatbuffer's."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python import schema_py_generated as schema

    from edgeqat import inspect, requant
    from edgeqat.lm import export, train
    from edgeqat.lm.model import SOFTMAX_RANGE, LmShape, TinyLm

    windows = text.load_text(None, 32).train[::20]
    shape = LmShape(context=32, dim=32, layers=1, heads=2)
    float_model = TinyLm(shape)
    train.pretrain(float_model, windows, train.Schedule(40, 32, 3e-3, warmup=4), 0)
    model = train.copy_of(float_model)
    train.calibrate(model, windows, batches=2, batch_size=8)
    tflite = export.to_tflite(model, "full_integer", windows)
    model.frozen = model.freeze()
    expected = [(("0.q", "0.k", "0.score"), True), ((SOFTMAX_RANGE, "0.v", "0.attn"), False)]
    grids = [[requant.int8_grid(*(model.bounds(n) if isinstance(n, str) else n)) for n in names]
             for names, _ in expected]

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite, 0))
    g = {s.signatureKey.decode(): s.subgraphIndex for s in m.signatureDefs}["prefill"]
    sub = m.subgraphs[g]
    names = inspect.schema_names(schema.BuiltinOperator)
    matmuls = [op for op in sub.operators if names[inspect.builtin_code(m, op)] == "BATCH_MATMUL"]
    assert len(matmuls) == 2
    for op, grid, (_, adjoint) in zip(matmuls, grids, expected, strict=True):
        stored = [sub.tensors[t].quantization for t in (*op.inputs[:2], op.outputs[0])]
        assert [(np.float32(s.scale[0]), int(s.zeroPoint[0])) for s in stored] == grid
        assert bool(op.builtinOptions.adjY) == adjoint

    it = Interpreter(model_content=tflite, experimental_preserve_all_tensors=True)
    prefill = it.get_signature_runner("prefill")
    moved = checked = 0
    for w in windows[:6]:
        prefill(tokens=w[None, :32])
        for op, grid, (_, adjoint) in zip(matmuls, grids, expected, strict=True):
            a, b, out = (it.get_tensor(int(t), g).astype(np.int64)
                         for t in (*op.inputs[:2], op.outputs[0]))
            (sa, za), (sb, zb), (so, zo) = grid
            rule = requant.batch_matmul_rule(None, zb)  # this CPU, XNNPACK or builtin
            got = requant.integer_matmul((a - za) * sa, (b - zb) * sb, grid, rule,
                                         transpose_b=adjoint).numpy()
            np.testing.assert_array_equal(np.round(got / so) + zo, out)
            one = np.floor(((a - za) @ np.swapaxes(b - zb, -1, -2) if adjoint else
                            (a - za) @ (b - zb)) * (np.float64(sa) * sb / so) + 0.5)
            moved += int((np.clip(one + zo, -128, 127) != out).sum())
            checked += out.size
    # The kernels' rounding is not the float graph's: some outputs differ by a step.
    assert checked == 6 * (2 * 32 * 32 + 2 * 32 * 16) and moved > 0, moved
