"""The language-model report: the table of models, fidelity, samples, and a plot."""

from __future__ import annotations

import io
from pathlib import Path

from edgeqat.report import html_page

FIGURE_TITLES = {"perplexity_speed": "Perplexity and decode speed per model"}


def _f(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def table_rows(r: dict) -> list[str]:
    """The Markdown table of every model: the README and the benchmark use it too."""
    threads = sorted({t for row in r["rows"] for t in row["speed"]}, key=int)
    head = ("| model | perplexity | bits/byte | gap recovered | top-1 vs float | KL (nats) | "
            "bytes | " + " | ".join(f"prefill tok/s ({t}T) | decode tok/s ({t}T)"
                                    for t in threads) + " |")
    lines = [head, "|" + "---|" * (7 + 2 * len(threads))]
    for row in r["rows"]:
        speed = " | ".join(f"{row['speed'][t]['prefill_tokens_per_s']:.0f} | "
                           f"{row['speed'][t]['decode_tokens_per_s']:.0f}" for t in threads)
        lines.append(f"| {row['label']} | {_f(row['perplexity'])} | "
                     f"{_f(row['bits_per_byte'])} | {_pct(row.get('gap_recovered'))} | "
                     f"{_pct(row.get('top1_agreement'))} | {_f(row.get('kl'), 4)} | "
                     f"{row['bytes']:,} | {speed} |")
    return lines


def to_markdown(r: dict, plots: dict[str, str] | None = None) -> str:
    p, m, d, b = r["pipeline"], r["model"], r["data"], r["budget"]
    fid = r["fidelity"]
    kt = fid["keras_vs_tflite"]
    lines = [f"# edgeqat report: {p['name']} (language model, {p['precision'].upper()})", "",
             f"Device `{r['device']['name']}` ({r['device']['connection']}, "
             f"{r['device']['runtime']} {r['device']['runtime_version']}, delegate "
             f"{r['device']['delegate']}). Shipped: `{b['shipped']}.tflite`, perplexity "
             f"{100 * b['perplexity_increase']:+.2f}% vs float "
             f"({'within' if b['within_budget'] else 'OUTSIDE'} the "
             f"{100 * b['max_perplexity_increase']:.1f}% budget).", "",
             "## Data", "",
             f"Corpus `{d['corpus']}`: {d['bytes']:,} bytes in {d['documents']} documents, "
             f"sha256 `{d['sha256']}`; byte tokens (vocabulary {d['vocab']}), split by "
             f"document; windows of {d['context']} tokens: {d['windows']['train']} train, "
             f"{d['windows']['validation']} validation, {d['windows']['test']} test.", "",
             "## Model", "",
             f"Decoder-only transformer: {m['layers']} layers, dim {m['dim']}, {m['heads']} "
             f"heads, MLP x{m['mlp_ratio']}, context {m['context']}, "
             f"{m['parameters']:,} parameters; {m['source']} ({m['pretrain_steps']} float "
             f"steps), QAT {m['qat_steps']} steps.", "",
             "## Models on the device", "",
             f"Teacher-forced on {r['rows'][0]['tokens']:,} test tokens; top-1 and KL "
             "against the float Keras model; gap recovered = (PTQ - QAT) / (PTQ - float) "
             "perplexity.", "", *table_rows(r), "",
             "## Fidelity", "",
             f"- Keras QAT model vs `{b['shipped']}.tflite` (prefill): top-1 agreement "
             f"{_pct(kt['top1_agreement'])}, logits within {kt['steps']} output steps "
             f"{_pct(kt['logits_within'])}, largest difference {kt['max_steps']} steps."]
    dv = fid.get("decode_vs_prefill")
    if dv:
        lines.append(f"- Decode loop vs prefill, same tokens: positions whose logits are all "
                     f"within {dv['steps']} steps {_pct(dv['positions_within'])} "
                     f"(largest {dv['max_steps']} steps), top-1 {_pct(dv['top1_agreement'])}.")
    kk = fid.get("xnnpack_vs_reference_kernels")
    if kk:
        lines.append(f"- Yardstick, the same file on this machine with XNNPACK vs LiteRT's "
                     f"reference kernels: top-1 {_pct(kk['top1_agreement'])}, logits within "
                     f"{kk['steps']} steps {_pct(kk['logits_within'])} (largest "
                     f"{kk['max_steps']}): two correct integer implementations differ this "
                     "much.")
    hv = r.get("host_vs_device")
    if hv:
        lines.append(f"- This machine vs the device, same file: identical prefill logits "
                     f"{_pct(hv['prefill']['logits_within'])}; generated tokens "
                     f"{'identical' if hv['same_generated_tokens'] else 'DIFFER'}.")
    lines += ["", "Every op reads and writes integer tensors in both signatures: " +
              "; ".join(f"`{s}`: {', '.join(ops)}" for s, ops in r["full_integer"].items()),
              "", "## Generated (greedy, decode signature)", ""]
    for name, sample in r["samples"].items():
        if name == "prompt":
            continue
        lines += [f"`{name}`:", "", "```", r["samples"]["prompt"] + sample, "```", ""]
    keras = r["keras"]
    lines += ["## Keras models (host, same windows)", "",
              "| model | perplexity | top-1 vs float | KL |", "|---|---|---|---|"]
    lines += [f"| {n} | {_f(k['perplexity'])} | {_pct(k.get('top1_agreement'))} | "
              f"{_f(k.get('kl'), 4)} |" for n, k in keras.items()]
    lines += ["", "Stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())]
    for name, path in (plots or {}).items():
        lines += ["", f"![{FIGURE_TITLES[name]}]({path})"]
    return "\n".join(lines) + "\n"


def make_figures(r: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    names = [row["label"] for row in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.bar(range(len(rows)), [row["perplexity"] for row in rows], color="#4c72b0")
    a1.set_xticks(range(len(rows)), names, rotation=25, ha="right")
    a1.set_ylabel("perplexity (test)")
    lo = min(row["perplexity"] for row in rows)
    a1.set_ylim(lo * 0.95, max(row["perplexity"] for row in rows) * 1.02)
    a2.bar(range(len(rows)), [row["speed"]["1"]["decode_tokens_per_s"] for row in rows],
           color="#55a868")
    a2.set_xticks(range(len(rows)), names, rotation=25, ha="right")
    a2.set_ylabel("decode tokens/s (1 thread)")
    fig.suptitle(FIGURE_TITLES["perplexity_speed"])
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return {"perplexity_speed": buf.getvalue()}


def to_html(r: dict, figures: dict[str, bytes]) -> str:
    return html_page(to_markdown(r), figures, FIGURE_TITLES, r["pipeline"]["name"])


def headline(r: dict, output_dir: Path) -> str:
    by = {row["name"]: row for row in r["rows"]}
    b = r["budget"]
    shipped = b["shipped"]
    ptq = "ptq_" + shipped.partition("_")[2]
    return (f"perplexity: float {by['float']['perplexity']:.3f} | PTQ {by[ptq]['perplexity']:.3f}"
            f" | QAT {by[shipped]['perplexity']:.3f} "
            f"({'within' if b['within_budget'] else 'OUTSIDE'} budget) | report: "
            f"{Path(output_dir) / 'report.md'}")
