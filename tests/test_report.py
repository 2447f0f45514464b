"""The side-by-side report: tables with intervals from run folders, plots, samples, a self-contained page."""

from __future__ import annotations

import base64
import json
import os
import shutil
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
    # Chance from the runs' own classes (6); the few-shot folder here holds no runs, so none is claimed.
    assert "Chance (a uniform guess over 6 classes): 16.7%." in md and md.count("Chance") == 1
    assert data["chance"] == {"longtail": pytest.approx(1 / 6), "fewshot": None}
    for name in ("fewshot.png", "longtail-buckets.png", "accuracy-vs-extra.png", "samples-synth.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _Page()
    page.feed(result.html.read_text())
    assert page.tables == 3 and len(page.images) == 4 and not page.links  # nothing fetched from elsewhere
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def _browser() -> str:
    """Debian's Chromium (or GENAUG_CHROMIUM); CI installs it and sets GENAUG_REQUIRE_BROWSER=1 so that a
    missing browser fails there instead of skipping."""
    path = os.environ.get("GENAUG_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if not path:
        reason = "needs playwright and Chromium (pip install playwright; apt-get install chromium)"
        if os.environ.get("GENAUG_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def render(browser: str, page_path) -> dict:
    """Open a page in headless Chromium; what a reader would see and what went wrong on the way."""
    from playwright.sync_api import sync_playwright

    # No background networking: this machine's network is closed and the page must not need one.
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-quic"]
    seen = {"console": [], "errors": [], "requests": []}
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=flags)
        try:
            page = chromium.new_page()
            page.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("requestfailed", lambda r: seen["errors"].append(f"failed: {r.url[:80]}"))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            seen["images"] = page.eval_on_selector_all(
                "img", "els => els.map(e => ({ok: e.complete && e.naturalWidth > 0 && e.naturalHeight > 0,"
                       " shown: e.getBoundingClientRect().width > 0, alt: e.alt}))")
            seen["tables"] = page.eval_on_selector_all("table", "els => els.map(e => e.rows.length)")
            seen["title"] = page.title()
            seen["height"] = page.evaluate("document.body.scrollHeight")
        finally:
            chromium.close()
    return seen


def test_report_page_renders_in_headless_chromium(runs, kit, tmp_path):
    browser = _browser()
    f = runs["folders"]
    cfg = ReportConfig(title="Browser check", longtail=[f"real={f['real'][0]},{f['real'][1]}",
                                                        f"+synth={f['synth'][0]}"],
                       fewshot=[f"real={runs['fs']}"], datasets=[f"+synth={runs['synth']}"],
                       real_test=str(runs["real"]), clip_model=str(kit("clip")), oracle=None,
                       output=str(tmp_path / "rep"))
    page_path = build_report(cfg).html
    seen = render(browser, page_path)
    assert seen["title"] == "Browser check"
    assert not seen["errors"] and not seen["console"], seen
    assert seen["requests"] == [page_path.resolve().as_uri()]  # self-contained: nothing else fetched
    assert len(seen["images"]) == 4 and all(i["ok"] and i["shown"] for i in seen["images"]), seen["images"]
    assert len(seen["tables"]) == 3 and min(seen["tables"]) >= 2 and seen["height"] > 500

    # The same checks catch a broken page: an undecodable image, a script error, a fetched resource.
    broken = tmp_path / "broken.html"
    broken.write_text(page_path.read_text().replace(
        "</body>", '<img alt="x" src="data:image/png;base64,AAAA"><script>undefined_call()</script>'
                   '<link rel="stylesheet" href="https://example.invalid/a.css"></body>'))
    bad = render(browser, broken)
    assert not all(i["ok"] for i in bad["images"])
    assert any("undefined_call" in e for e in bad["errors"])
    assert len(bad["requests"]) > 1


def test_report_needs_inputs():
    with pytest.raises(ValueError, match="at least one"):
        ReportConfig()
    with pytest.raises(ValueError, match="name=path"):
        ReportConfig(longtail=["just-a-path"])
