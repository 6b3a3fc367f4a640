"""Latency of several .tflite models measured side by side, as ratios with their spread.

The machines edgeqat runs on are shared and noisy, so one model timed now and another timed
a minute later says little. ``interleaved`` builds every interpreter first, then runs
``rounds`` rounds; in each round every model is invoked ``runs`` times in turn (the order
rotates between rounds), at each thread count. A model's figure is the median over rounds
of its per-round median; a ratio between two models is the median of their per-round
ratios, and its spread the range of those ratios. Batch 1, one fixed random input per
model, XNNPACK (LiteRT's default delegate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    """Per-round medians in microseconds, for one model at one thread count."""

    rounds_us: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return float(np.median(self.rounds_us))

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-round medians."""
        r = np.asarray(self.rounds_us)
        return float((r.max() - r.min()) / np.median(r))


def _random_input(detail: dict, rng) -> np.ndarray:
    shape = [int(s) for s in detail["shape"]]
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _invoker(model: bytes, threads: int, rng):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, num_threads=threads)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], _random_input(d, rng))
    return interp.invoke


def interleaved(models: dict[str, bytes], threads: tuple[int, ...] = (1, 2),
                rounds: int = 5, runs: int = 20, warmup: int = 3,
                seed: int = 0) -> dict[str, dict[int, Timing]]:
    """Times every model at every thread count in interleaved rounds.

    Returns:
      name -> threads -> Timing.
    """
    if rounds < 1 or runs < 1:
        raise ValueError("rounds and runs must be >= 1")
    rng = np.random.default_rng(seed)
    names = list(models)
    invoke = {(n, t): _invoker(models[n], t, rng) for n in names for t in threads}
    for fn in invoke.values():
        for _ in range(warmup):
            fn()
    out = {n: {t: Timing() for t in threads} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for t in threads:
            for n in order:
                fn = invoke[(n, t)]
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                out[n][t].rounds_us.append(1e6 * float(np.median(times)))
    return out


def ratio(a: Timing, b: Timing) -> dict:
    """a / b (below 1: a is faster) as the median of per-round ratios, with their range."""
    r = np.asarray(a.rounds_us) / np.asarray(b.rounds_us)
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


# The vector extensions XNNPACK's int8 and float kernels choose between: on x86 int8
# gains most over float with AVX-512 VNNI / AVX-VNNI / AMX, little with AVX2 alone; on
# ARM the dot-product (asimddp) and i8mm instructions.
ISA_FLAGS = {"x86": ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"),
             "arm": ("asimd", "asimddp", "i8mm")}


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This machine's CPU model and the vector extensions that decide int8 vs float speed,
    e.g. ``AMD EPYC (avx2, fma; no avx512f, avx512_vnni, ...)``: a timing ratio holds for
    the CPU it was measured on."""
    import platform

    try:
        text = open(cpuinfo).read()
    except OSError:
        return platform.machine() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.split(":")[0].strip() in ("model name", "Model")), platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                  if line.split(":")[0].strip() in ("flags", "Features")), set())
    wanted = ISA_FLAGS["arm" if "asimd" in flags else "x86"]
    has = [f for f in wanted if f in flags]
    lacks = [f for f in wanted if f not in flags]
    return f"{model} ({', '.join(has) or 'none'}; no {', '.join(lacks)})" if lacks else \
        f"{model} ({', '.join(has)})"
