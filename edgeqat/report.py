"""Results -> report.json, report.md and report.html with plots (written atomically).

The plots are made with matplotlib's Agg backend: ``report.md`` links them as PNG files
under ``plots/``; ``report.html`` embeds them as base64 PNG, so it opens offline, alone.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
import sys
from pathlib import Path

from edgeqat import __version__, modes
from edgeqat.config import DeviceConfig, PipelineConfig
from edgeqat.modes import FLOAT


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def build_report(cfg: PipelineConfig, device: DeviceConfig, data: dict, trained, tuned,
                 validation, ops, stage_seconds: dict, *, diagnostics=(), auto=None,
                 edgetpu=None, storage=None) -> dict:
    """Collects every number a reader needs into one JSON-able dict.

    Args:
      tuned: the QAT result, or None (auto mode that stopped before QAT).
      diagnostics: ``diagnostics.Diagnostics`` objects (per-layer error).
      auto: the ``auto.AutoResult`` in auto mode: its decisions, and the model it chose.
      edgetpu: the ``edgetpu.EdgeTpuReport`` of the shipped model, if computed.
      storage: ``inspect.storage`` of the shipped flatbuffer (bytes, tensors per stored
        type: says whether int4 weights are stored as ``int4``).
    """
    mode = cfg.convert.mode
    qat_name = modes.spec(mode).qat_name
    m = validation.models
    shipped = auto.chosen if auto is not None else qat_name
    float_acc = trained.accuracy
    drop = float_acc - m[shipped].accuracy
    lat = {name: {"median_ms": r.latency["median_ms"], "p90_ms": r.latency["p90_ms"],
                  "min_ms": r.latency["min_ms"], "runs": r.latency["runs"]}
           for name, r in m.items()}
    accuracy = {"float_keras": float_acc, "float_tflite": m[FLOAT].accuracy}
    accuracy |= {name: r.accuracy for name, r in m.items() if name != FLOAT}
    if tuned is not None:
        accuracy["qat_keras"] = tuned.accuracy
    budget = {
        "max_accuracy_drop": cfg.validate.max_accuracy_drop,
        "shipped": shipped,
        "drop_vs_float": drop,
        "within_budget": drop <= cfg.validate.max_accuracy_drop + 1e-12,
    }
    if auto is None:
        budget["qat_drop_vs_float"] = drop
    return {
        "edgeqat_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "pipeline": {"name": cfg.name, "source": cfg.source, "seed": cfg.seed, "mode": mode,
                     "pipeline_mode": cfg.mode},
        "device": validation.device | {"profile_source": device.source,
                                       "hardware": device.hardware},
        "versions": versions(),
        "model": _model_source(cfg),
        "data": data,
        "accuracy": accuracy,
        "budget": budget,
        "agreement": {name: a.to_dict() for name, a in validation.agreement.items()},
        "size_bytes": {name: r.size_bytes for name, r in m.items()},
        "latency": lat,
        # The shipped model's median-latency speed-up over float, and its mode (None for
        # auto mode's partly-float candidates): 16x8 or int4 models are not int8.
        "speedup_over_float": {"model": shipped, "mode": modes.mode_of(shipped),
                               "median": lat[FLOAT]["median_ms"] / lat[shipped]["median_ms"]},
        "ops": {
            "model": f"{shipped}.tflite",
            "full_integer": all(op.is_integer for op in ops),
            "counts": _count([op.name for op in ops]),
            "storage": storage,
        },
        "device_vs_host": {
            name: cmp.to_dict() | {"host_accuracy": validation.host_accuracy[name],
                                   "device_accuracy": m[name].accuracy}
            for name, cmp in validation.device_vs_host.items()
        },
        "edgetpu": edgetpu.to_dict() if edgetpu is not None else None,
        "diagnostics": [d.to_dict(cfg.diagnostics.worst) for d in diagnostics],
        "auto": auto.to_dict() if auto is not None else None,
        "stage_seconds": stage_seconds,
    }


def _model_source(cfg: PipelineConfig) -> dict:
    """Where the float model came from; ``imported_from`` names a Keras 3 file's Keras."""
    if not cfg.model.path:
        return {"builder": cfg.model.builder}
    from edgeqat.keras3_import import keras3_version

    version = keras3_version(cfg.model.path)
    return {"path": cfg.model.path,
            "imported_from": f"Keras {version}" if version else None}


def versions() -> dict:
    """Versions of the host-side toolchain that produced the models."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert",
                "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _count(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


_LABELS = {"float": "float (TFLite)"}


def _label(name: str) -> str:
    if name in _LABELS:
        return _LABELS[name]
    kind, _, prec = name.partition("_")
    return f"{kind.upper() if kind in ('ptq', 'qat') else kind} {prec}".strip()


def _model_rows(r: dict) -> list[tuple[str, str, float | None, float, dict]]:
    """(artifact name, label, accuracy, size, latency) of every TFLite model, float first."""
    return [(name, _label(name), r["accuracy"].get(name if name != "float" else
                                                   "float_tflite"), size, r["latency"][name])
            for name, size in r["size_bytes"].items()]


def to_markdown(r: dict, plots: dict[str, str] | None = None) -> str:
    """A human-readable report with the same numbers as report.json.

    Args:
      r: from ``build_report``.
      plots: figure name -> relative PNG path to link (``write_report`` makes them).
    """
    mode = r["pipeline"]["mode"]
    acc = r["accuracy"]
    dev = r["device"]
    shipped = r["budget"]["shipped"]
    lines = [
        f"# edgeqat report: {r['pipeline']['name']}",
        "",
        f"Pipeline `{r['pipeline']['source']}`, seed {r['pipeline']['seed']}, mode `{mode}`"
        f" ({r['pipeline'].get('pipeline_mode', 'qat')}); "
        f"device `{dev['profile']}` ({dev['connection']}), {dev['runtime']} "
        f"{dev['runtime_version']}, delegate {dev['delegate']}, {dev['num_threads']} thread(s), "
        f"{dev['cpu'].get('machine', '?')}"
        + (f" ({dev['hardware']})" if dev.get("hardware") else "")
        + f". Created {r['created']} by edgeqat "
        f"{r['edgeqat_version']}.",
        "",
        "Host toolchain: " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
        + ".",
        "",
        *_model_source_markdown(r.get("model")),
        f"Data: `{r['data']['name']}`, evaluated on {r['data']['test']} test samples "
        f"(the same samples for every model).",
        "",
        "| model | accuracy | size | latency median | latency p90 |",
        "|---|---:|---:|---:|---:|",
        f"| float (Keras) | {_pct(acc['float_keras'])} | | | |",
    ]
    for _name, label, a, size, lat in _model_rows(r):
        lines.append(f"| {label} | {_pct(a)} | {size / 1024:.1f} KiB | "
                     f"{lat['median_ms']:.3f} ms | {lat['p90_ms']:.3f} ms |")
    if "qat_keras" in acc:
        lines.append(f"| QAT (Keras, fake-quant) | {_pct(acc['qat_keras'])} | | | |")
    b = r["budget"]
    verdict = "within" if b["within_budget"] else "OUTSIDE"
    lines += [
        "",
        f"Shipped model: `{shipped}.tflite`. "
        f"{_label(shipped)} vs float: {100 * b['drop_vs_float']:+.2f} points drop, {verdict} "
        f"the budget of {100 * b['max_accuracy_drop']:.2f} points.",
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
    for w in r.get("warnings") or []:
        lines.append(f"Warning: {w}.")
    lines += _auto_markdown(r.get("auto"))
    lines += _diagnostics_markdown(r.get("diagnostics") or [])
    ops = r["ops"]
    lines += [
        "",
        f"`{ops['model']}` is {'fully integer' if ops['full_integer'] else 'NOT fully integer'}"
        f"; ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops["counts"].items())) + ".",
        *storage_markdown(ops["model"], ops.get("storage")),
        "",
        _speedup_markdown(r["speedup_over_float"]),
        "",
        "Stage timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
        + ".",
        "",
    ]
    for name, path in (plots or {}).items():
        lines += [f"![{FIGURE_TITLES[name]}]({path})", ""]
    return "\n".join(lines)


def _speedup_markdown(speedup: dict) -> str:
    mode = f" ({speedup['mode']})" if speedup.get("mode") else ""
    return (f"Speed-up of `{speedup['model']}.tflite`{mode} over float (median latency): "
            f"{speedup['median']:.2f}x.")


def _model_source_markdown(source: dict | None) -> list[str]:
    if not source or not source.get("path"):
        return []
    how = (f"imported from {source['imported_from']} (rebuilt as tf_keras)"
           if source.get("imported_from") else "a tf_keras model")
    return [f"Float model: `{source['path']}`, {how}.", ""]


def storage_markdown(model: str, st: dict | None, limit: int = 30) -> list[str]:
    """The shipped file's stored constants: bytes per type, then each tensor's type."""
    if not st or not st.get("constants"):
        return []
    per_type = ", ".join(f"{t} {b:,} B" for t, b in sorted(st["constant_bytes"].items()))
    lines = ["", f"Stored in `{model}` ({st['bytes']:,} bytes): constants {per_type}.", "",
             "| constant tensor | stored type | shape | bytes |", "|---|---|---|---:|"]
    consts = sorted(st["constants"], key=lambda c: -c["bytes"])
    for c in consts[:limit]:
        name = c["name"].split(";")[0]
        lines.append(f"| `{name}` | {c['type']} | {'x'.join(map(str, c['shape']))} | "
                     f"{c['bytes']:,} |")
    if len(consts) > limit:
        lines.append(f"| ... {len(consts) - limit} smaller, in report.json | | | |")
    return lines


def _auto_markdown(a: dict | None) -> list[str]:
    if not a:
        return []
    lines = ["", f"## Auto mode (decided on the {a['decided_on']} split)", "",
             "| step | action | accuracy | drop | within budget | seconds |",
             "|---|---|---:|---:|:-:|---:|"]
    for d in a["decisions"]:
        drop = "" if d["drop"] is None else f"{100 * d['drop']:+.2f} pts"
        ok = "" if d["accuracy"] is None else ("yes" if d["within_budget"] else "no")
        lines.append(f"| {d['step']} | {d['action']} | {_pct(d['accuracy'])} | {drop} | {ok} "
                     f"| {d['seconds']:.1f} |")
    lines.append("")
    if a["within_budget"]:
        lines.append(f"Chosen: `{a['chosen']}`, within the budget of "
                     f"{100 * a['budget']:.2f} points.")
    else:
        lines.append(f"Chosen: `{a['chosen']}`, the most accurate candidate; it MISSES the "
                     f"budget of {100 * a['budget']:.2f} points by "
                     f"{100 * a['missed_by']:.2f} points.")
    return lines


def _diagnostics_markdown(diags: list[dict]) -> list[str]:
    lines = []
    for d in diags:
        lines += ["", f"## Per-layer error: `{d['model']}` vs {d['reference']} "
                  f"({d['method'].replace('_', ' ')}, {d['samples']} samples)", "",
                  f"Worst layers (lowest SQNR): {', '.join(f'`{n}`' for n in d['worst'])}.", "",
                  "| layer | SQNR dB | channel SQNR dB | RMSE / step | scale |",
                  "|---|---:|---:|---:|---:|"]
        for e in d["layers"]:
            lines.append(f"| {e['layer']} | {e['sqnr_db']:.1f} | {e['channel_sqnr_db']:.1f} | "
                         f"{e['rmse_steps']:.2f} | {e['scale']:.3g} |")
    return lines


# ------------------------------------------------------------------------------ figures

FIGURE_TITLES = {
    "accuracy": "Accuracy per model and precision",
    "layer_error": "Per-layer quantization error (SQNR)",
    "latency_size": "Latency and size per model",
    "auto": "Auto-mode decisions",
}


def make_figures(r: dict) -> dict[str, bytes]:
    """The report's plots as PNG bytes, by name (see ``FIGURE_TITLES``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}
    rows = _model_rows(r)

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=96)
        plt.close(fig)
        return buf.getvalue()

    names = ["float (Keras)"] + [label for _, label, *_ in rows]
    accs = [r["accuracy"]["float_keras"]] + [a or 0.0 for _, _, a, *_ in rows]
    if "qat_keras" in r["accuracy"]:
        names.append("QAT (Keras)")
        accs.append(r["accuracy"]["qat_keras"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["#4c72b0" if n.startswith("float") else "#dd8452" if n.startswith("PTQ")
              else "#55a868" if n.startswith("QAT") else "#8172b2" for n in names]
    ax.bar(range(len(names)), [100 * a for a in accs], color=colors)
    floor = 100 * (r["accuracy"]["float_keras"] - r["budget"]["max_accuracy_drop"])
    ax.axhline(floor, color="k", ls="--", lw=1, label="float - budget")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(max(0, min(100 * min(accs), floor) - 5), 100.5)
    ax.legend(loc="lower right")
    ax.set_title(FIGURE_TITLES["accuracy"])
    figs["accuracy"] = png(fig)

    diags = r.get("diagnostics") or []
    if diags:
        fig, axes = plt.subplots(1, len(diags), figsize=(5 * len(diags), 3.6), squeeze=False)
        for ax, d in zip(axes[0], diags, strict=True):
            layers = [e["layer"] for e in d["layers"]]
            score = [e["score_db"] for e in d["layers"]]
            worst = d["worst"][:1]
            ax.barh(range(len(layers)), score,
                    color=["#c44e52" if n in worst else "#4c72b0" for n in layers])
            ax.set_yticks(range(len(layers)), layers)
            ax.invert_yaxis()
            ax.set_xlabel("SQNR (dB, min of tensor / channel); red: the worst")
            ax.set_title(f"{d['model']} ({d['method'].replace('_', ' ')})", fontsize=9)
        figs["layer_error"] = png(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.4))
    labels = [label for _, label, *_ in rows]
    ax1.bar(range(len(rows)), [lat["median_ms"] for *_, lat in rows], color="#4c72b0")
    ax1.set_xticks(range(len(rows)), labels, rotation=25, ha="right")
    ax1.set_ylabel("median latency (ms)")
    ax2.bar(range(len(rows)), [size / 1024 for _, _, _, size, _ in rows], color="#55a868")
    ax2.set_xticks(range(len(rows)), labels, rotation=25, ha="right")
    ax2.set_ylabel("size (KiB)")
    fig.suptitle(FIGURE_TITLES["latency_size"])
    figs["latency_size"] = png(fig)

    a = r.get("auto")
    if a:
        steps = [d for d in a["decisions"] if d["accuracy"] is not None]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        ax.bar(range(len(steps)), [100 * d["accuracy"] for d in steps],
               color=["#55a868" if d["within_budget"] else "#c44e52" for d in steps])
        ax.axhline(100 * (a["float_accuracy"] - a["budget"]), color="k", ls="--", lw=1)
        ax.set_xticks(range(len(steps)), [f"{d['step']}\n{d['seconds']:.1f} s" for d in steps])
        ax.set_ylabel(f"accuracy on {a['decided_on']} (%)")
        ax.set_title(f"{FIGURE_TITLES['auto']}: chose {a['chosen']}")
        figs["auto"] = png(fig)
    return figs


def to_html(r: dict, figures: dict[str, bytes]) -> str:
    """One self-contained HTML page: the Markdown report's content, figures inline."""
    return html_page(to_markdown(r), figures, FIGURE_TITLES, r["pipeline"]["name"])


def html_page(markdown: str, figures: dict[str, bytes], titles: dict[str, str],
              name: str) -> str:
    """The HTML form of a Markdown report (tables, headings, paragraphs), figures inline
    with their ``titles``."""
    body = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()).replace("`", "") for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:]).replace('`', '')}</h2>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if in_table:
        body.append("</table>")
    for fig, data in figures.items():
        b64 = base64.b64encode(data).decode()
        body.append(f'<figure id="fig-{fig}"><img alt="{titles[fig]}" '
                    f'src="data:image/png;base64,{b64}"><figcaption>{titles[fig]}'
                    "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>edgeqat report: {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, data: object, markdown: str, indent: int = 1) -> None:
    """A benchmark's results, ``out``.json and ``out``.md, each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out.with_suffix(".json"), json.dumps(data, indent=indent) + "\n")
    _atomic_write(out.with_suffix(".md"), markdown)


def write_report(r: dict, directory: Path, renderer=None) -> None:
    """Writes report.json, report.md (+ plots/*.png) and report.html into ``directory``.

    ``renderer``: a module with ``make_figures``, ``to_markdown`` and ``to_html`` for
    another kind of report (``edgeqat.lm.report``); by default this module's.
    """
    directory = Path(directory)
    render = renderer or sys.modules[__name__]
    figures, markdown, html = render.make_figures(r), render.to_markdown, render.to_html
    (directory / "plots").mkdir(exist_ok=True)
    for name, data in figures.items():
        _atomic_write(directory / "plots" / f"{name}.png", data)
    _atomic_write(directory / "report.json", json.dumps(r, indent=2) + "\n")
    _atomic_write(directory / "report.md",
                  markdown(r, {n: f"plots/{n}.png" for n in figures}))
    _atomic_write(directory / "report.html", html(r, figures))


def headline(r: dict, output_dir: Path) -> str:
    """The lines the CLI prints when it is done."""
    mode = r["pipeline"]["mode"]
    acc = r["accuracy"]
    b = r["budget"]
    shipped = b["shipped"]
    row = modes.spec(mode)
    parts = [f"float {_pct(acc['float_keras'])}", f"PTQ {mode} {_pct(acc.get(row.ptq_name))}"]
    if row.qat_name in acc:
        parts.append(f"QAT {mode} {_pct(acc[row.qat_name])}")
    if r.get("auto"):
        parts.append(f"auto chose {shipped} {_pct(acc.get(shipped))}")
    parts[-1] += f" ({'within' if b['within_budget'] else 'OUTSIDE'} budget)"
    return " | ".join(parts) + f" | report: {Path(output_dir) / 'report.md'}"
