"""report.html: self-contained, opens offline in headless Chromium with its figures.

Chromium comes from Debian: ``apt-get install -y chromium``. Without it the browser tests
skip and say so.
"""

import base64
import re
import shutil
import subprocess

import pytest

from edgeqat import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")


def sample_report(auto: bool = True) -> dict:
    """A report.json as build_report writes it, with made-up numbers."""
    lat = {"median_ms": 0.02, "p90_ms": 0.03, "min_ms": 0.01, "runs": 5}
    layers = [{"layer": n, "tensor": f"m/{n}/Conv2D", "rmse_steps": 0.29, "sqnr_db": db,
               "channel_sqnr_db": db - 1, "score_db": db - 1, "scale": 0.02, "elements": 64}
              for n, db in (("conv_0", 42.0), ("conv_bad", 9.0), ("logits", 40.0))]
    decisions = [
        {"step": "ptq_int8", "action": "PTQ int8, minmax ranges", "accuracy": 0.90,
         "drop": 0.08, "within_budget": False, "seconds": 3.1, "full_integer": True},
        {"step": "qat_int8", "action": "QAT int8, 1 epoch(s)", "accuracy": 0.97,
         "drop": 0.01, "within_budget": True, "seconds": 20.4, "full_integer": True},
    ]
    return {
        "edgeqat_version": "0.1.0", "created": "2026-11-24T00:00:00+00:00",
        "pipeline": {"name": "demo <&>", "source": "p.toml", "seed": 0, "mode": "int8",
                     "pipeline_mode": "auto" if auto else "qat"},
        "device": {"profile": "local_cpu", "runtime": "ai_edge_litert",
                   "runtime_version": "2.3.0", "delegate": "xnnpack", "delegate_note": "",
                   "num_threads": 1, "cpu": {"machine": "x86_64"}, "connection": "local"},
        "versions": {"tensorflow": "2.21.0"},
        "data": {"name": "digits", "test": 120},
        "accuracy": {"float_keras": 0.98, "float_tflite": 0.98, "ptq_int8": 0.90,
                     "qat_int8": 0.97, "qat_keras": 0.97},
        "budget": {"max_accuracy_drop": 0.02, "shipped": "qat_int8", "drop_vs_float": 0.01,
                   "within_budget": True},
        "agreement": {"qat_int8": {"top1": 1.0, "within_2_steps": 1.0, "max_abs_steps": 1.0}},
        "size_bytes": {"float": 40000, "ptq_int8": 20000, "qat_int8": 20000},
        "latency": {"float": lat, "ptq_int8": lat, "qat_int8": lat},
        "speedup_over_float": {"model": "qat_int8", "mode": "int8", "median": 1.0},
        "ops": {"model": "qat_int8.tflite", "full_integer": True, "counts": {"CONV_2D": 2}},
        "diagnostics": [{"model": "ptq_int8", "method": "quantization_debugger",
                         "reference": "float model", "samples": 8, "layers": layers,
                         "worst": ["conv_bad", "logits", "conv_0"]}],
        "auto": {"decisions": decisions, "chosen": "qat_int8", "budget": 0.02,
                 "float_accuracy": 0.98, "decided_on": "test", "missed_by": 0.0,
                 "within_budget": True, "sensitivity": None} if auto else None,
        "stage_seconds": {"float": 1.0},
    }


def test_write_report_files(tmp_path):
    r = sample_report()
    report.write_report(r, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.json", "report.md", "report.html", "plots"} <= names
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["accuracy.png", "auto.png", "latency_size.png", "layer_error.png"]
    md = (tmp_path / "report.md").read_text()
    for name in pngs:
        assert f"](plots/{name})" in md
    assert "## Auto mode" in md and "| ptq_int8 | PTQ int8" in md and "Chosen: `qat_int8`" in md
    assert "Worst layers (lowest SQNR): `conv_bad`" in md
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: offline
    assert "demo &lt;&amp;&gt;" in page


def test_missed_budget_is_stated():
    r = sample_report()
    r["auto"] |= {"chosen": "ptq_int8", "within_budget": False, "missed_by": 0.06}
    md = report.to_markdown(r)
    assert "MISSES the budget of 2.00 points by 6.00 points" in md
    assert "## Auto mode" not in report.to_markdown(sample_report(auto=False))
    assert "auto.png" not in str(report.make_figures(sample_report(auto=False)).keys())


def test_speedup_names_the_shipped_model_and_its_mode():
    """A 16x8 model's speed-up is not reported under an int8 name."""
    r = sample_report()
    r["speedup_over_float"] = {"model": "ptq_int16x8", "mode": "int16x8", "median": 0.5}
    md = report.to_markdown(r)
    assert "Speed-up of `ptq_int16x8.tflite` (int16x8) over float (median latency): 0.50x." in md


def _chromium(*args, tmp_path):
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@needs_chromium
def test_report_renders_in_chromium_with_its_figures(tmp_path):
    report.write_report(sample_report(), tmp_path)
    page = tmp_path / "report.html"
    # The test (not the report) adds a script that records which images decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => {"
        "const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 100);"
        "document.body.setAttribute('data-figures-decoded', ok.length);});</script></body>")))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(),
                    tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-figures-decoded="4"' in dom.stdout, dom.stdout[:500]
    for fig in ("fig-accuracy", "fig-layer_error", "fig-latency_size", "fig-auto"):
        assert f'id="{fig}"' in dom.stdout

    shot = tmp_path / "report.png"
    p = _chromium(f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri(),
                  tmp_path=tmp_path)
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    # plots put coloured bars on the page: many strongly coloured (non-grey) pixels
    colourful = (pixels.max(-1) - pixels.min(-1)) > 0.25
    assert colourful.mean() > 0.01
