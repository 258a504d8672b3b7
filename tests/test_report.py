"""The HTML report (`snakemake --report`) of a small run, opened in headless Chromium.

The report is one self-contained page, a React app with no URL routes: tests/report/probe.js
is appended to a copy of it, clicks through the menus (the route is the URL hash) and writes
what rendered into the DOM as JSON, which `chromium --dump-dom` hands back. Chromium is
Debian's `chromium`, installed with apt-get when missing and allowed (root), as
tests/slurm/start.sh does for SLURM.
"""
import base64
import csv
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import smk, write_config

PROBE = Path(__file__).parent / "report" / "probe.js"

# Two encoders and one decoder, no compression: the smallest run whose report has every part.
CONFIG = {
    "seed": 0,
    "dataset": {"name": "tiny", "kind": "synthetic", "word_count_threshold": 1,
                "synthetic": {"n_train": 40, "n_val": 8, "n_test": 8, "img_size": 64}},
    "encoders": {
        "lite0": {"timm_name": "tf_efficientnet_lite0", "weights": "efficientnet-lite0", "img_size": 64},
        "mnv3s": {"timm_name": "mobilenetv3_small_100", "weights": "pretrain", "img_size": 64,
                  "pretrain": {"epochs": 1, "batch_size": 20}},
    },
    "baseline_encoder": "lite0",
    "decoders": {"updown": {"arch": "updown", "input_encoding_size": 32, "rnn_size": 32, "att_hid_size": 16}},
    "train": {"epochs": 1, "batch_size": 10, "threads": 1},
    "compress": {"encoders": []},
    "scst": {"encoders": []},
    "distill": {"encoders": []},
    "evaluate": {"beam_size": 2, "latency_images": 3},
}
OUTPUTS = ["table.csv", "pareto.png", "summary.md"]  # what rule `table` marks with report()
# Wide enough that the plot is drawn at its own size beside the table's description.
WINDOW = (2000, 1300)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    write_config(work, CONFIG)
    smk(work, "results/table.csv")
    smk(work, "--report", "results/report.html")
    return work


@pytest.fixture(scope="module")
def rules(run_dir):
    """Every rule that ran: each leaves a benchmark folder."""
    names = {p.name for p in (run_dir / "logs/benchmarks").iterdir()}
    assert {"synthetic_dataset", "encoder_weights", "features", "train_xe", "pack", "score", "table"} <= names
    return names


# --- the page itself ----------------------------------------------------------------------------

class _Loads(HTMLParser):
    """What a page loads when it opens: every src, and the href of <link> (not of <a>, a click)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value and (key == "src" or (tag == "link" and key == "href")):
                self.urls.append((tag, value))


def external_loads(page: str):
    parser = _Loads()
    parser.feed(page)
    return [(tag, url) for tag, url in parser.urls if not url.startswith(("data:", "#"))]


def embedded_results(page: str) -> dict:
    m = re.search(r'<script id="results">\s*var results = (.*?);\s*</script>', page, flags=re.S)
    assert m, "no results in the report"
    return json.loads(m.group(1))


def data_uri_bytes(uri: str) -> bytes:
    assert uri.startswith("data:") and ";base64," in uri, uri[:80]
    return base64.b64decode(uri.split(";base64,", 1)[1])


def test_report_is_one_self_contained_file(run_dir):
    page = (run_dir / "results/report.html").read_text(encoding="utf-8")
    assert external_loads(page) == []
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page), "the page's CSS loads a URL"
    results = embedded_results(page)
    assert sorted(Path(p).name for p in results) == sorted(OUTPUTS)
    for path, entry in results.items():
        assert data_uri_bytes(entry["data_uri"]) == (run_dir / path).read_bytes(), path
        assert entry["caption"], f"{path} has no description"


# --- the page in a browser ----------------------------------------------------------------------

def install_chromium() -> str:
    """apt-get install chromium; returns why it could not, or ''."""
    if os.geteuid() != 0:
        return "chromium is missing and installing it needs root"
    if shutil.which("apt-get") is None:
        return "chromium is missing and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    r = subprocess.run(install, capture_output=True, text=True, env=env)
    if r.returncode != 0:  # a stale package list: refresh it once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        r = subprocess.run(install, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return "apt-get install chromium failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return ""


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium")
    if exe is None:
        why = install_chromium()
        exe = shutil.which("chromium")
        if exe is None:
            pytest.skip(f"report test did not run: {why or 'chromium not found after installing it'}")
    return exe


@pytest.fixture(scope="module")
def browse(chromium, run_dir, tmp_path_factory):
    """browse(route) -> the probe's JSON; browse(route, screenshot=PATH) saves the page as PNG.

    No network: every host resolves to nothing, so a page that loaded anything from outside breaks."""
    tmp = tmp_path_factory.mktemp("browser")
    page = tmp / "report.html"
    head, body_end, tail = (run_dir / "results/report.html").read_text(encoding="utf-8").rpartition("</body>")
    assert body_end, "the report has no </body>"
    page.write_text(f"{head}<script>{PROBE.read_text()}</script>\n{body_end}{tail}", encoding="utf-8")
    cache = {}

    def run(route, screenshot=None):
        if screenshot is None and route in cache:
            return cache[route]
        profile = tmp / f"profile-{route}-{'shot' if screenshot else 'dom'}"
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--force-color-profile=srgb",
                "--virtual-time-budget=30000"]  # virtual: timers run at once, so only the work takes time
        args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
        r = subprocess.run(args + [f"{page.as_uri()}#{route}"], capture_output=True, text=True, timeout=180)
        if screenshot:
            assert Path(screenshot).is_file(), f"no screenshot of #{route}:\n{r.stderr[-3000:]}"
            return None
        found = re.findall(r'<pre id="probe" hidden="">(.*?)</pre>', r.stdout, flags=re.S)
        assert found, f"#{route}: no probe output (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        result = json.loads(html.unescape(found[-1]))
        assert result["ok"], f"#{route}: {result['error']}"
        assert external_loads(r.stdout) == [], "the rendered page loads from outside"
        cache[route] = result["data"]
        return result["data"]

    return run


def test_rule_graph_and_workflow_description_render(browse, rules):
    d = browse("workflow")
    graph = d["rulegraph"]
    assert rules <= set(graph["texts"]), f"rules missing from the rule graph: {rules - set(graph['texts'])}"
    assert graph["painted"] > 1000, graph
    assert "Atliha" in d["description"] and "tiny" in d["description"]  # workflow.rst, with the config filled in
    links = dict(d["links"])
    for name in OUTPUTS:
        assert links[name].startswith("javascript:app.showResultInfo("), links
    assert links["Results"].startswith("javascript:app.showCategory("), links
    assert d["linked_table_rows"] == 2  # the table.csv link opened the table


def test_per_rule_runtimes_render(browse, rules):
    d = browse("stats")
    runtimes = d["runtimes"]
    assert rules <= set(runtimes["texts"]), f"rules missing from the runtimes: {rules - set(runtimes['texts'])}"
    assert "runtime [s]" in runtimes["texts"]
    assert runtimes["painted"] > 1000 and d["timeline"]["painted"] > 1000, d


def inked_rows(pixels):
    """Indices of the rows with dark pixels (text, axes) in an H x W x 3 image."""
    return np.flatnonzero((pixels.sum(axis=2) < 200).any(axis=1))


def test_table_and_pareto_plot_render(browse, run_dir, tmp_path):
    d = browse("results")
    # The table in table.csv's description: the CSV's header and every cell, as written.
    with open(run_dir / "results/table.csv", newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert d["table"]["header"] == [header]
    assert d["table"]["rows"] == rows
    assert sorted(r[0] for r in rows) == ["lite0-updown-xe-fp32", "mnv3s-updown-xe-fp32"]
    assert "one row per model variant" in d["caption"]
    assert data_uri_bytes(d["csv_href"]) == (run_dir / "results/table.csv").read_bytes()
    # The plot: the PNG itself, decoded by the browser at its own size.
    png = run_dir / "results/pareto.png"
    image = d["image"]
    assert data_uri_bytes(image["src"]) == png.read_bytes()
    plot = Image.open(png).convert("RGB")
    assert image["natural"] == list(plot.size)
    # ... and painted on the screen, pixel for pixel. The screenshot is laid out in a taller viewport
    # than the page the probe measured (Chromium resizes it to the window to capture), and the page
    # centres the plot vertically: take its column from the probe and find its rows by their ink.
    shot = tmp_path / "results.png"
    browse("results", screenshot=shot)
    left, width = round(image["rect"][0]), round(image["rect"][2])
    assert width == plot.width, image
    want = np.asarray(plot, dtype=np.int16)
    column = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)[:, left:left + width]
    top = inked_rows(column)[0] - inked_rows(want)[0]
    seen = column[top:top + plot.height]
    assert top >= 0 and seen.shape == want.shape, (top, seen.shape)
    diff = np.abs(seen - want).mean()
    assert diff < 2, f"the screenshot differs from pareto.png by {diff:.1f} per channel"


def test_summary_renders(browse, run_dir):
    d = browse("summary")
    summary = (run_dir / "results/summary.md").read_text(encoding="utf-8")
    assert d["text"].strip() == summary.strip()
    assert "## updown" in d["text"] and "Šešok" in d["text"]
    assert data_uri_bytes(d["md_href"]) == summary.encode("utf-8")
