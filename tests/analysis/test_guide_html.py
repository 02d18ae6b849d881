"""The HTML guide opened from disk in headless Chromium: it renders, every image loads, no console errors.

Chromium comes from Debian's packages (installed here when missing, as root or through sudo -n); Playwright drives it.
The screenshot is kept in $TEST_ARTIFACTS_DIR (default test-artifacts/) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis.build_guide import build
from tests.analysis import synthetic

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", ROOT / "test-artifacts"))
# Flags for a closed network: no background connections, no first-run or sync chatter.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _install_chromium() -> str | None:
    """Path of Debian's chromium, installing the package when it is missing; None (with why) when it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        return None
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                    ["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            subprocess.run(prefix + command, env=env, capture_output=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if shutil.which("chromium"):
            return shutil.which("chromium")
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _install_chromium()
    if path is None:
        pytest.skip("Debian's chromium is not installed and could not be installed (apt-get unavailable, not root "
                    "and no passwordless sudo, or no package registry)")
    return path


@pytest.mark.slow
def test_guide_renders_in_headless_chromium_with_every_image_and_no_console_error(chromium: str,
                                                                                  tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    db = synthetic.build(tmp_path / "study.duckdb", alpaca=True)
    synthetic.write_judgments(db, synthetic.judgments("judge-a", scores=lambda g, s, e: 50.0 + 10 * s + e,
                                                      prefer=lambda g, s, e, position: "response"))
    html = build(db, tmp_path / "reports")
    console, page_errors, failed = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.getAttribute('src'), ok: e.complete && e.naturalWidth > 0,"
                       " w: e.naturalWidth}))")
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            body = page.inner_text("body")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "guide.png"), full_page=True)
            page.screenshot(path=str(ARTIFACTS / "guide-top.png"))
            seen = (list(console), list(page_errors), list(failed))  # the guide's own, before the control
            # the check can fail: with one figure gone, the same probes see a broken image and a failed load
            next(html.parent.joinpath("figures").glob("pareto_*.png")).unlink()
            control_failed: list[str] = []
            page.on("requestfailed", lambda r: control_failed.append(r.url))
            page.reload(wait_until="load")
            broken = page.eval_on_selector_all("img", "els => els.filter(e => e.naturalWidth === 0).length")
        finally:
            browser.close()
    console, page_errors, failed = seen
    assert [m for m in console if m[0] in ("error", "warning")] == [] and page_errors == [] and failed == []
    assert len(images) >= 8, images
    assert all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    assert all(i["w"] >= 600 for i in images)
    assert broken == 1 and any("pareto_" in u for u in control_failed)
    for title in ("Summary", "Recommendations", "Across tasks", "Full fine-tuning vs LoRA vs partial methods",
                  "Pareto fronts: quality against cost", "Learning rate: best value and sensitivity",
                  "Judged quality: an LLM judge on the kept generations", "Generations side by side", "Reproduce"):
        assert title in headings
    assert "full beats lora on sms_spam" in body
    assert "Blue <b>sky</b>" in body  # a generation shown as text, not markup
