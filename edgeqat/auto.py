"""``mode = "auto"``: the cheapest quantization that meets the accuracy budget.

Steps, stopping at the first within budget (``validate.max_accuracy_drop`` vs float):

1. PTQ int8 (with the ``[ptq]`` calibration / AdaRound options);
2. QAT int8 (``auto.qat``);
3. higher precision, most sensitive layers first: 16x8, int16 activations for the whole
   model (``auto.int16_activations``; TF's converter has no per-layer int16, so this step
   is whole-model), then the ``auto.float_layers`` most sensitive layers left in float
   one at a time (TF selective quantization; gives up full integer).

If none is within budget, the most accurate candidate ships and the report says by how
much it missed. Every decision records its measured accuracy and its cost in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgeqat.config import PipelineConfig
from edgeqat.modes import FLOAT, MODES, Mode


@dataclass(frozen=True)
class Decision:
    """One step of auto mode: what was tried, what it scored, what it cost."""

    step: str  # artifact name, e.g. "ptq_int8"
    action: str  # what was done, in words
    accuracy: float | None
    drop: float | None  # float accuracy minus this accuracy
    within_budget: bool
    seconds: float
    full_integer: bool = True

    def to_dict(self) -> dict:
        return {"step": self.step, "action": self.action, "accuracy": self.accuracy,
                "drop": self.drop, "within_budget": self.within_budget,
                "seconds": round(self.seconds, 2), "full_integer": self.full_integer}


@dataclass(frozen=True)
class AutoResult:
    decisions: tuple[Decision, ...]
    chosen: str
    tflites: dict  # step name -> flatbuffer, every candidate built
    budget: float
    float_accuracy: float
    decided_on: str
    sensitivity: object = None  # diagnostics.Sensitivity, when it was needed
    calibration: object = None  # ptq.Calibrated
    qat: object = None  # flow.Quantized, when QAT ran

    @property
    def missed_by(self) -> float:
        """How far the chosen model is outside the budget (0 when within)."""
        d = next(d for d in self.decisions if d.step == self.chosen)
        return max(0.0, d.drop - self.budget)

    def to_dict(self) -> dict:
        return {"decisions": [d.to_dict() for d in self.decisions], "chosen": self.chosen,
                "budget": self.budget, "float_accuracy": self.float_accuracy,
                "decided_on": self.decided_on, "missed_by": self.missed_by,
                "within_budget": self.missed_by == 0.0,
                "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None}


def choose(cfg: PipelineConfig, data, trained) -> AutoResult:
    """Runs the auto-mode steps on the trained float model (see the module docstring)."""
    from edgeqat import convert, diagnostics, ptq
    from edgeqat.flow import quantize_aware, resume_context
    from edgeqat.train import accuracy

    if cfg.auto.decide_on == "validation" and len(data.x_val):
        x, y, split = data.x_val, data.y_val, "validation"
    else:
        x, y, split = data.x_test, data.y_test, "test"
    budget = cfg.validate.max_accuracy_drop
    float_acc = accuracy(trained.model, x, y)
    decisions: list[Decision] = []
    tflites: dict[str, bytes] = {}

    def record(step, action, model, seconds, full_integer=True):
        acc = diagnostics.tflite_accuracy(model, x, y)
        drop = float_acc - acc
        tflites[step] = model
        decisions.append(Decision(step, action, acc, drop, drop <= budget + 1e-12,
                                  seconds, full_integer))
        return decisions[-1].within_budget

    def done():
        return any(d.within_budget for d in decisions)

    start = time.perf_counter()
    cal = ptq.calibrate(trained.model, data.x_calib, cfg.ptq)
    extra = f", {cfg.ptq.calibration} ranges" + (", AdaRound" if cfg.ptq.adaround else "")
    int8, int16x8 = MODES[Mode.INT8], MODES[Mode.INT16X8]
    record(int8.ptq_name, f"PTQ int8{extra}", ptq.quantize(cal), time.perf_counter() - start)

    quantized = None
    if not done() and cfg.auto.qat:
        start = time.perf_counter()
        quantized = quantize_aware(trained, data, cfg.convert.mode, cfg.policy, cfg.qat,
                                   seed=cfg.seed, float_learning_rate=cfg.model.learning_rate,
                                   context=resume_context(cfg))
        record(quantized.name, f"QAT {cfg.convert.mode}, {cfg.qat.epochs} epoch(s)",
               quantized.tflite, time.perf_counter() - start)

    sens = None
    if not done() and cfg.auto.int16_activations:
        start = time.perf_counter()
        record(int16x8.ptq_name, "PTQ 16x8 (int16 activations, whole model, min/max ranges)",
               convert.to_tflite(trained.model, int16x8.mode, calibration=data.x_calib),
               time.perf_counter() - start)

    if not done() and cfg.auto.float_layers > 0:
        start = time.perf_counter()
        sens = diagnostics.sensitivity(cal, trained.model, x, y, how="float")
        decisions.append(Decision("sensitivity", "ranked layers by accuracy regained in "
                                  "float: " + ", ".join(s.layer for s in sens.layers),
                                  None, None, False, time.perf_counter() - start))
        floated: list = []
        for s in sens.layers[: cfg.auto.float_layers]:
            start = time.perf_counter()
            floated.append(s)
            names = "+".join(f.layer for f in floated)
            record(f"mixed_float_{len(floated)}",
                   f"PTQ int8 with {names} in float",
                   ptq.quantize(cal, float_nodes=[f.tensor for f in floated]),
                   time.perf_counter() - start, full_integer=False)
            if done():
                break

    tried = [d for d in decisions if d.accuracy is not None]
    within = [d for d in tried if d.within_budget]
    chosen = within[0] if within else max(tried, key=lambda d: (d.accuracy, -tried.index(d)))
    return AutoResult(tuple(decisions), chosen.step, tflites, budget, float_acc, split,
                      sens, cal, quantized)


def run_auto(cfg: PipelineConfig, device, data, trained, stage, warnings=()):
    """The pipeline's stages after the float model, in auto mode; returns PipelineResult.

    Auto mode is a policy over the same flow as the pipeline's: its QAT step is
    ``flow.quantize_aware`` and its validation and report are ``flow.finish``.
    """
    from edgeqat import convert
    from edgeqat.flow import finish

    with stage("auto"):
        result = choose(cfg, data, trained)
    tflites = {FLOAT: convert.to_tflite(trained.model, FLOAT)}
    tflites.update(result.tflites)
    diag = []
    with stage("diagnose"):
        if cfg.diagnostics.enabled:
            diag = _diagnose(cfg, data, trained, result)
    return finish(cfg, device, data, trained, tflites, result.chosen, result.qat, stage,
                  diagnostics=diag, auto=result, warnings=warnings)


def _diagnose(cfg, data, trained, result) -> list:
    from edgeqat import diagnostics

    x = data.x_calib[: cfg.diagnostics.samples]
    out = [diagnostics.ptq_layer_errors(result.calibration, trained.model, x)]
    if result.qat is not None:
        out.append(diagnostics.direct_layer_errors(result.qat.tflite, result.qat.tuned.model,
                                                   x, result.qat.name))
    return out
