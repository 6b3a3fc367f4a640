"""Results -> report.json and report.md (written atomically into the artifact dir)."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from edgeqat import __version__
from edgeqat.config import DeviceConfig, PipelineConfig


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def build_report(cfg: PipelineConfig, device: DeviceConfig, data: dict, trained, tuned,
                 validation, ops, stage_seconds: dict, edgetpu=None) -> dict:
    """Collects every number a reader needs into one JSON-able dict."""
    mode = cfg.convert.mode
    qat_name, ptq_name = f"qat_{mode}", f"ptq_{mode}"
    m = validation.models
    float_acc = trained.accuracy
    qat_acc = m[qat_name].accuracy
    drop = float_acc - qat_acc
    lat = {name: {"median_ms": r.latency["median_ms"], "p90_ms": r.latency["p90_ms"],
                  "min_ms": r.latency["min_ms"], "runs": r.latency["runs"]}
           for name, r in m.items()}
    return {
        "edgeqat_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "pipeline": {"name": cfg.name, "source": cfg.source, "seed": cfg.seed, "mode": mode},
        "device": validation.device | {"profile_source": device.source,
                                       "hardware": device.hardware},
        "data": data,
        "accuracy": {
            "float_keras": float_acc,
            "float_tflite": m["float"].accuracy,
            ptq_name: m[ptq_name].accuracy,
            "qat_keras": tuned.accuracy,
            qat_name: qat_acc,
        },
        "budget": {
            "max_accuracy_drop": cfg.validate.max_accuracy_drop,
            "qat_drop_vs_float": drop,
            "within_budget": drop <= cfg.validate.max_accuracy_drop + 1e-12,
        },
        "agreement": {name: a.to_dict() for name, a in validation.agreement.items()},
        "size_bytes": {name: r.size_bytes for name, r in m.items()},
        "latency": lat,
        "int8_speedup_median": lat["float"]["median_ms"] / lat[qat_name]["median_ms"],
        "ops": {
            "model": f"{qat_name}.tflite",
            "full_integer": all(op.is_integer for op in ops),
            "counts": _count([op.name for op in ops]),
        },
        "device_vs_host": {
            name: cmp.to_dict() | {"host_accuracy": validation.host_accuracy[name],
                                   "device_accuracy": m[name].accuracy}
            for name, cmp in validation.device_vs_host.items()
        },
        "edgetpu": edgetpu.to_dict() if edgetpu is not None else None,
        "stage_seconds": stage_seconds,
    }


def _count(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def to_markdown(r: dict) -> str:
    """A human-readable report with the same numbers as report.json."""
    mode = r["pipeline"]["mode"]
    qat_name, ptq_name = f"qat_{mode}", f"ptq_{mode}"
    acc, size, lat = r["accuracy"], r["size_bytes"], r["latency"]
    dev = r["device"]
    lines = [
        f"# edgeqat report: {r['pipeline']['name']}",
        "",
        f"Pipeline `{r['pipeline']['source']}`, seed {r['pipeline']['seed']}, mode `{mode}`; "
        f"device `{dev['profile']}` ({dev['connection']}), {dev['runtime']} "
        f"{dev['runtime_version']}, delegate {dev['delegate']}, {dev['num_threads']} thread(s), "
        f"{dev['cpu'].get('machine', '?')}"
        + (f" ({dev['hardware']})" if dev.get("hardware") else "")
        + f". Created {r['created']} by edgeqat "
        f"{r['edgeqat_version']}.",
        "",
        f"Data: `{r['data']['name']}`, evaluated on {r['data']['test']} test samples "
        f"(the same samples for every model).",
        "",
        "| model | accuracy | size | latency median | latency p90 |",
        "|---|---:|---:|---:|---:|",
        f"| float (Keras) | {_pct(acc['float_keras'])} | | | |",
    ]
    for name, key, label in (("float", "float_tflite", "float (TFLite)"),
                             (ptq_name, ptq_name, f"PTQ {mode}"),
                             (qat_name, qat_name, f"QAT {mode}")):
        lines.append(f"| {label} | {_pct(acc[key])} | {size[name] / 1024:.1f} KiB | "
                     f"{lat[name]['median_ms']:.3f} ms | {lat[name]['p90_ms']:.3f} ms |")
    lines.append(f"| QAT (Keras, fake-quant) | {_pct(acc['qat_keras'])} | | | |")
    b = r["budget"]
    verdict = "within" if b["within_budget"] else "OUTSIDE"
    lines += [
        "",
        f"QAT {mode} vs float: {100 * b['qat_drop_vs_float']:+.2f} points drop, {verdict} the "
        f"budget of {100 * b['max_accuracy_drop']:.2f} points.",
        "",
    ]
    for name, a in r["agreement"].items():
        lines.append(f"Keras QAT model vs `{name}.tflite`: top-1 agreement {_pct(a['top1'])}, "
                     f"{_pct(a['within_2_steps'])} of outputs within 2 quantization steps "
                     f"(max {a['max_abs_steps']:.1f} steps).")
    for name, c in r.get("device_vs_host", {}).items():
        lines.append(
            f"Device vs host, `{name}.tflite`: accuracy {_pct(c['device_accuracy'])} on "
            f"`{dev['profile']}` vs {_pct(c['host_accuracy'])} on this machine; "
            + ("outputs identical" if c["identical"] else
               f"max {c['max_abs_steps']:.0f} step(s), {_pct(c['mismatched_fraction'])} of "
               f"outputs differ, top-1 agreement {_pct(c['top1_agreement'])}") + ".")
    if r.get("edgetpu"):
        lines.append(f"Edge TPU pre-check of `{r['ops']['model']}`: {r['edgetpu']['summary']}.")
    ops = r["ops"]
    lines += [
        "",
        f"`{ops['model']}` is {'fully integer' if ops['full_integer'] else 'NOT fully integer'}"
        f"; ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops["counts"].items())) + ".",
        "",
        f"int8 speed-up over float (median latency): {r['int8_speedup_median']:.2f}x.",
        "",
        "Stage timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(r: dict, directory: Path) -> None:
    """Writes report.json and report.md into ``directory``."""
    directory = Path(directory)
    _atomic_write(directory / "report.json", json.dumps(r, indent=2) + "\n")
    _atomic_write(directory / "report.md", to_markdown(r))


def headline(r: dict, output_dir: Path) -> str:
    """The lines the CLI prints when it is done."""
    mode = r["pipeline"]["mode"]
    acc = r["accuracy"]
    b = r["budget"]
    return (f"float {_pct(acc['float_keras'])} | PTQ {mode} {_pct(acc[f'ptq_{mode}'])} | "
            f"QAT {mode} {_pct(acc[f'qat_{mode}'])} "
            f"({'within' if b['within_budget'] else 'OUTSIDE'} budget) | "
            f"report: {Path(output_dir) / 'report.md'}")
