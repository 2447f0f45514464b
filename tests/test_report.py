"""The side-by-side report: tables with intervals from run folders, plots, samples, a self-contained page."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest

from genaug.evaluate.classifier import ClassifierConfig, ci95, train_classifier
from genaug.evaluate.report import ReportConfig, build_report
from test_classifier import write


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.tables, self.stack = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.stack.append(tag) if tag not in ("img", "meta") else None
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(attrs.get("href") or attrs.get("src"))
        if tag == "table":
            self.tables += 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    real = write(root / "real", "train", [30, 12, 6, 3, 2, 1], 1)
    write(real, "test", [4] * 6, 2)
    synth = write(root / "synth", "train", [3] * 6, 3, lambda label, j: {"prompt": f"a photo of class {label}"})
    common = dict(real_data=str(real), epochs=2, min_steps=4, batch_size=16, many_threshold=20, few_threshold=5,
                  progress=False, device="cpu", checkpoint_every=0)
    folders = {"real": [], "synth": []}
    for seed in (0, 1):
        folders["real"].append(train_classifier(ClassifierConfig(output=str(root / f"real-{seed}"), seed=seed,
                                                                 **common)).output)
    folders["synth"].append(train_classifier(ClassifierConfig(output=str(root / "synth-run"),
                                                              extra_data=[str(synth)], **common)).output)
    fs = root / "fs"
    fs.mkdir()
    (fs / "fewshot.json").write_text(json.dumps({"table": {"1": {"mean": 0.3, "ci95": 0.05, "trials": [0.25, 0.35]},
                                                           "4": {"mean": 0.5, "ci95": 0.02, "trials": [0.5, 0.5]}}}))
    return {"root": root, "real": real, "synth": synth, "folders": folders, "fs": fs}


def test_report_tables_plots_samples_and_page(runs, kit, tmp_path):
    f = runs["folders"]
    cfg = ReportConfig(longtail=[f"real={f['real'][0]},{f['real'][1]}", f"+synth={f['synth'][0]}"],
                       fewshot=[f"real={runs['fs']}"], datasets=[f"+synth={runs['synth']}"],
                       real_test=str(runs["real"]), clip_model=str(kit("clip")), oracle=None,
                       output=str(tmp_path / "rep"))
    result = build_report(cfg)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    finals = [json.loads((p / "final.json").read_text()) for p in f["real"]]
    mean, half = ci95([x["accuracy"] for x in finals])
    assert data["longtail"]["real"]["accuracy"] == pytest.approx([mean, half])
    assert data["longtail"]["+synth"]["extra_images"] == 18
    assert set(data["generation"]["+synth"]) >= {"clip_t", "clip_i", "fid", "kid", "oracle_accuracy"}
    md = result.markdown.read_text()
    assert "| real | 2 |" in md and "k=1" in md and "30.0 ± 5.0" in md
    for name in ("fewshot.png", "longtail-buckets.png", "accuracy-vs-extra.png", "samples-synth.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _Page()
    page.feed(result.html.read_text())
    assert page.tables == 3 and len(page.images) == 4 and not page.links  # nothing fetched from elsewhere
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def test_report_needs_inputs():
    with pytest.raises(ValueError, match="at least one"):
        ReportConfig()
    with pytest.raises(ValueError, match="name=path"):
        ReportConfig(longtail=["just-a-path"])
