"""The search page at `/`, rendered by headless Chromium (Debian's `chromium`, which `make test`
installs) against a real server: both lists, what moved, and the timings. The screenshot is
saved under test-output/ for a person to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from serving import ServerThread, document, settings_for, upsert, with_training_figures

from tandem import rag24
from tandem.server.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = shutil.which("chromium")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# As the environment's own probe runs it: no sandbox (root), and nothing that reaches out.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1100", "--virtual-time-budget=60000",
]  # fmt: skip


def chromium(profile: Path, *args: str) -> str:
    assert CHROMIUM is not None
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    return done.stdout


def page_of_fifty(tmp_path: Path, settings: Settings, data: rag24.Rag24) -> str:
    """The search page's DOM for one query, from a server holding 50 segments."""
    running = ServerThread(settings)
    try:
        upsert(running.stub(), [document(s.id, s.text) for s in data.segments[:50]])
        url = f"http://127.0.0.1:{running.running.http_port}/?q=vicarious%20trauma"
        return chromium(tmp_path / "profile", "--dump-dom", url)
    finally:
        running.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run `make chromium`")
def test_search_page_shows_stage_one_beside_the_reranked_list(tmp_path, bi_int8, ce_int8, data):
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], ce_int8[0]))
    try:
        upsert(running.stub(), [document(s.id, s.text) for s in data.segments[:400]])
        query = data.topics[0].query
        url = f"http://127.0.0.1:{running.running.http_port}/?q={urllib.parse.quote(query)}"
        dom = chromium(tmp_path / "profile", "--dump-dom", url)
        OUTPUT.mkdir(exist_ok=True)
        screenshot = OUTPUT / "search-page.png"
        chromium(tmp_path / "profile", f"--screenshot={screenshot}", url)
    finally:
        running.stop()
    stage1 = re.search(r'<ol id="stage1">(.*?)</ol>', dom, re.S)
    reranked = re.search(r'<ol id="reranked">(.*?)</ol>', dom, re.S)
    assert stage1 is not None, dom[:2000]
    assert reranked is not None, dom[:2000]
    assert stage1.group(1).count("<li") == 10
    assert reranked.group(1).count("<li") == 10
    assert "reranked 50 of 50 candidates" in dom  # the page's default: rerank every candidate
    assert re.search(r"rerank \d+\.\d ms", dom)
    assert "p=0." in reranked.group(1)  # probabilities, beside the logits
    assert "Stand-in reranker" in dom  # the page says the rankings are not a real reranker's
    # What moved: every reranked hit says where stage 1 had it.
    assert len(re.findall(r'class="tag (?:up|down|same)"', reranked.group(1))) == 10
    # Stage 1 names its first stage (the server's default) and where each hit was found.
    assert "Stage 1: hybrid (dense and BM25, fused by RRF)" in dom
    assert re.search(r"dense #\d+|BM25 #\d+", stage1.group(1))
    assert 'class="error"' not in dom
    assert screenshot.stat().st_size > 20_000
    print(f"screenshot: {screenshot}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run `make chromium`")
def test_search_page_on_a_retrieve_only_server_shows_stage_one_and_says_why(
    tmp_path, bi_int8, data
):
    dom = page_of_fifty(tmp_path, settings_for(tmp_path / "c", bi_int8[0], None), data)
    stage1 = re.search(r'<ol id="stage1">(.*?)</ol>', dom, re.S)
    assert stage1 is not None
    assert stage1.group(1).count("<li") == 10
    assert "no reranker (retrieve-only)" in dom
    assert 'class="error"' not in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run `make chromium`")
def test_search_page_says_when_its_reranker_ranks_worse_than_stage_one(
    tmp_path, bi_int8, ce_int8, data
):
    worse = with_training_figures(
        ce_int8[0], tmp_path / "worse", trained=0.632, hybrid=0.754, p_value=1e-4
    )
    dom = page_of_fifty(tmp_path, settings_for(tmp_path / "c", bi_int8[0], worse), data)
    notice = re.search(r'<div id="notice">(.*?)</div>', dom, re.S)
    assert notice is not None, dom[:2000]
    assert (
        "This reranker ranks worse than stage 1 alone: on its 137 held-out queries it "
        "scored nDCG@10 0.632 against 0.754 for hybrid alone" in notice.group(1)
    )
    assert 'class="error"' not in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run `make chromium`")
def test_docs_page_renders_every_route_without_a_cdn(tmp_path, bi_int8, ce_int8):
    running = ServerThread(settings_for(tmp_path / "c", bi_int8[0], ce_int8[0], token="t"))
    try:
        dom = chromium(
            tmp_path / "profile", "--dump-dom", f"http://127.0.0.1:{running.running.http_port}/docs"
        )
    finally:
        running.stop()
    # Swagger UI from the package's own files (the machine reaches no CDN), listing each route.
    for route in ("/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/v1/embeddings", "/v1/search"):
        assert f'data-path="{route}"' in dom, route
    assert "authorize" in dom.lower()  # the bearer token can be entered on the page
