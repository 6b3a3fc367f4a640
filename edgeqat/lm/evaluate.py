"""Language-model figures from logits: perplexity, bits per byte, agreement, KL, fidelity.

Everything here is numpy on arrays the device runner brought back (raw int8 or float
logits) or the host computed (Keras / TensorFlow QAT model), so the same functions score
every model on the same windows.
"""

from __future__ import annotations

import math

import numpy as np


def dequantize(raw: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if np.issubdtype(raw.dtype, np.floating) or not scale:
        return raw.astype(np.float32)
    return (raw.astype(np.float32) - zero_point) * np.float32(scale)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def scores(logits: np.ndarray, targets: np.ndarray, reference: np.ndarray | None = None
           ) -> dict:
    """Teacher-forced figures of ``logits`` [N, T, V] for next tokens ``targets`` [N, T].

    ``reference`` (the float model's logits on the same windows) adds top-1 agreement and
    the mean KL(reference || model) per token, in nats.
    """
    lp = log_softmax(logits)
    nll = -float(np.take_along_axis(lp, targets[..., None], -1).mean())
    out = {"nll": nll, "perplexity": math.exp(nll), "bits_per_byte": nll / math.log(2),
           "tokens": int(targets.size)}
    if reference is not None:
        ref = log_softmax(reference)
        out["top1_agreement"] = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        out["kl"] = float((np.exp(ref) * (ref - lp)).sum(-1).mean())
    return out


def gap_recovered(float_ppl: float, ptq_ppl: float, qat_ppl: float) -> float | None:
    """(PTQ - QAT) / (PTQ - float); None when PTQ loses less than 0.1% of perplexity
    (nothing to recover: the ratio of two noise-sized numbers)."""
    gap = ptq_ppl - float_ppl
    if gap <= 1e-3 * float_ppl:
        return None
    return (ptq_ppl - qat_ppl) / gap


def step_agreement(a_raw: np.ndarray, b_raw: np.ndarray, steps: int = 2) -> dict:
    """Two integer logit tensors of one scale: top-1 agreement, the fraction of logits
    within ``steps`` and of positions whose every logit is within ``steps``, the largest
    difference."""
    d = np.abs(a_raw.astype(np.int32) - b_raw.astype(np.int32))
    return {"top1_agreement": float((a_raw.argmax(-1) == b_raw.argmax(-1)).mean()),
            "logits_within": float((d <= steps).mean()),
            "positions_within": float((d.max(-1) <= steps).mean()),
            "max_steps": int(d.max()) if d.size else 0, "steps": steps}


def to_steps(logits: np.ndarray, scale: float, zero_point: int,
             dtype: str = "int8") -> np.ndarray:
    """Float logits on an integer grid (a QAT model's; ``dtype`` int8 or int16) as the
    integers TFLite stores."""
    info = np.iinfo(dtype)
    return np.clip(np.round(logits / scale) + zero_point, info.min, info.max).astype(np.int32)
