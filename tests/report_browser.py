"""Open a Snakemake report in headless Chromium and show every result in it.

Used by the report test: clicks each category of the report's sidebar, then
each result's "show" (eye) button, and records what the page displayed (the
PNG's file name once the image has decoded, or the table of a CSV), the
JavaScript errors, and a screenshot of every result.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    # The machine's network is closed: no background connections to refuse.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class ReportVisit:
    results: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    shown: dict[str, str] = field(default_factory=dict)  # file name -> "image" | "table"
    errors: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)


def visit_report(report: Path, screenshot_dir: Path) -> ReportVisit:
    """Show every result of ``report``; screenshots go to ``screenshot_dir``."""
    from playwright.sync_api import sync_playwright

    visit = ReportVisit()
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda err: visit.errors.append(f"page error: {err}"))
        page.on("console", lambda msg: _console(visit, msg))
        page.goto(report.resolve().as_uri())
        page.wait_for_load_state("load")
        visit.results = page.evaluate("Object.keys(results)")
        visit.categories = sorted(page.evaluate("Object.keys(categories)"))
        page.screenshot(path=str(screenshot_dir / "report_home.png"))
        visit.screenshots.append(screenshot_dir / "report_home.png")
        for category in visit.categories:
            page.goto(report.resolve().as_uri())
            page.get_by_text(category, exact=True).click()
            eyes = page.locator("a[iconname=eye]")
            eyes.first.wait_for()
            for k in range(eyes.count()):
                eyes.nth(k).click()
                name = _shown(page)
                if name:
                    visit.shown[name[0]] = name[1]
                shot = screenshot_dir / f"report_{_slug(category)}_{k}.png"
                page.screenshot(path=str(shot))
                visit.screenshots.append(shot)
        browser.close()
    return visit


def _console(visit: ReportVisit, message) -> None:  # type: ignore[no-untyped-def]
    if message.type == "error":
        visit.errors.append(f"console: {message.text}")


def _shown(page) -> tuple[str, str] | None:  # type: ignore[no-untyped-def]
    """What the main pane shows after a click: a decoded PNG, or a CSV's table."""
    page.wait_for_timeout(300)
    images = page.evaluate(
        "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => i.src.slice(0, 200))"
    )
    for src in images:
        match = re.search(r"filename=([^;]+);", src)
        if src.startswith("data:image/png") and match:
            return match.group(1), "image"
    tables = page.evaluate(
        "Array.from(document.querySelectorAll('table th')).map(t => t.innerText)"
    )
    frames = page.evaluate(
        "Array.from(document.querySelectorAll('iframe')).map(f => f.src.slice(0, 200))"
    )
    for src in frames:
        match = re.search(r"filename=([^;]+);", src)
        if match:
            return match.group(1), "table"
    if tables:
        return "|".join(tables), "table"
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
