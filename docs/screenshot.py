"""Make the README screenshots: a real demo run, served by TensorBoard, rendered by headless Chromium.

One command (from the repository root, with the project installed)::

    pip install -e ".[docs]"       # Playwright's Python package; it drives the system Chromium
    apt-get install -y chromium    # Debian/Ubuntu (or pass --chromium PATH); no Playwright browser download
    python docs/screenshot.py      # runs the demo (~3 min on 2 CPU cores), then writes the three PNGs

``--logdir runs/demo`` reuses the log directory of an earlier ``make demo`` instead
of training (it must hold exactly one run). The script starts ``tensorboard
--logdir ...`` on localhost, waits until TensorBoard serves the callback's
images (keeping every logged step), and saves:

- ``docs/tensorboard.png``: the IMAGES tab at its default settings (cards about 350
  pixels wide), filtered to ``semantic_pullback/overview`` and ``.../probe_00``, at the
  last logged step, once both pictures are fully loaded.
- ``docs/tensorboard_time_series.png``: the TIME SERIES tab at its default card width,
  filtered the same way.
- ``docs/tensorboard_scalars.png``: the SCALARS tab with the callback's curves
  (cosine between gradient and Soft Pullback, drift, counterfactual gains) and accuracy.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from sp_lightning.tensorboard_server import fetch, fetch_json, serve_tensorboard, wait_until

DOCS = Path(__file__).resolve().parent
SHOWN = ("semantic_pullback/overview", "semantic_pullback/probe_00")
TAG_FILTER = "overview$|probe_00$"  # TensorBoard's tag filter is a regular expression
HEIGHT = 1000
SCALAR_FILTER = "gain$|cosine|drift|/acc"  # TensorBoard's tag filter is a regular expression
WIDTH = 1400
LOAD_TIMEOUT = 120.0
CHROMIUM_FLAGS = [  # quiet, offline, and able to run as root in a container
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python docs/screenshot.py", description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", help="reuse this demo log directory (one run) instead of running the demo")
    parser.add_argument("--out", default=str(DOCS), help="folder for the three PNGs")
    parser.add_argument("--chromium", help="Chromium executable (default: chromium or chromium-browser on PATH)")
    args = parser.parse_args(argv)
    args.chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if args.chromium is None or not os.access(args.chromium, os.X_OK):
        parser.error("no Chromium found: install it (apt-get install -y chromium) or pass --chromium PATH")
    if args.logdir is not None and not os.path.isdir(args.logdir):
        parser.error(f"--logdir {args.logdir} is not a directory; run `make demo` first or leave --logdir out")
    return args


def only_run(logdir: str) -> str:
    """The name TensorBoard gives the one run under ``logdir`` (its folder, relative to ``logdir``)."""
    folders = sorted({os.path.dirname(f) for f in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                                                             recursive=True)})
    runs = [os.path.relpath(folder, logdir).replace(os.sep, "/") for folder in folders]
    if len(runs) != 1:
        raise SystemExit(
            f"{logdir} holds {len(runs)} TensorBoard runs {runs}; the screenshot shows one. Point --logdir at a "
            "directory with a single demo run, or leave --logdir out to run the demo afresh."
        )
    return runs[0]


def newest_images(url: str, run: str) -> dict[str, tuple[int, tuple[int, int]]]:
    """Tag -> (step, (width, height)) of the newest picture TensorBoard serves for each of :data:`SHOWN`."""
    wait_until(lambda: fetch_json(url, "data/plugin/images/tags").get(run, {}),
               lambda tags: all(tag in tags for tag in SHOWN), LOAD_TIMEOUT, f"{SHOWN} of run {run!r}")
    newest = {}
    for tag in SHOWN:
        listed = fetch_json(url, "data/plugin/images/images", run=run, tag=tag)
        if not listed:
            raise RuntimeError(f"TensorBoard lists no pictures for {tag} of run {run!r}.")
        last = max(listed, key=lambda image: image["step"])
        picture = Image.open(io.BytesIO(fetch(url, "data/plugin/images/individualImage?" + last["query"])))
        newest[tag] = (last["step"], picture.size)
    return newest


def wait_for_pictures(page: Any, count: int) -> list[dict[str, float]]:
    """Wait until ``count`` pictures are fully loaded on ``page``; their on-screen boxes."""
    pictures = page.locator("img")
    wait_until(lambda: [pictures.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
                        for i in range(pictures.count())],
               lambda loaded: len(loaded) >= count and all(loaded), LOAD_TIMEOUT, f"{count} pictures on the page")
    page.wait_for_load_state("networkidle")
    return [pictures.nth(i).bounding_box() for i in range(count)]  # the first matches: the filtered category


def screenshot_images(browser: Any, url: str, run: str, path: Path) -> None:
    """The IMAGES tab at its default settings, filtered to the overview and the first probe panel."""
    newest = newest_images(url, run)
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    page.goto(url + "#images&tagFilter=" + urllib.parse.quote(TAG_FILTER, safe=""))
    boxes = wait_for_pictures(page, len(SHOWN))
    bottom = max(box["y"] + box["height"] for box in boxes)
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": WIDTH, "height": min(HEIGHT, bottom + 24)})
    page.close()
    shown = ", ".join(f"{tag} step {step} ({w}x{h}) shown {box['width']:.0f} px wide"
                      for (tag, (step, (w, h))), box in zip(newest.items(), boxes))
    print(f"{path}: {shown}, {path.stat().st_size // 1024} KB")


def screenshot_time_series(browser: Any, url: str, run: str, path: Path) -> None:
    """The TIME SERIES tab at its default card width, filtered to the overview and the first probe panel."""
    newest_images(url, run)
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    page.goto(url + "#timeseries")
    box = page.get_by_role("combobox", name="Filter tags (regex)")
    box.fill(TAG_FILTER)
    box.press("Escape")  # close the tag suggestions over the cards
    boxes = wait_for_pictures(page, len(SHOWN))
    bottom = max(box["y"] + box["height"] for box in boxes)
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": WIDTH, "height": min(HEIGHT, bottom + 40)})
    page.close()
    sizes = ", ".join(f"{box['width']:.0f}x{box['height']:.0f}" for box in boxes)
    print(f"{path}: {len(boxes)} image cards shown at {sizes} px, {path.stat().st_size // 1024} KB")


def screenshot_scalars(browser: Any, url: str, run: str, path: Path) -> None:
    """The SCALARS tab filtered to the callback's curves and accuracy, no smoothing, outliers shown."""
    tags = wait_until(lambda: fetch_json(url, "data/plugin/scalars/tags").get(run, {}),
                      lambda found: any(tag.startswith("semantic_pullback/") for tag in found),
                      LOAD_TIMEOUT, f"the scalars of run {run!r}")
    matching = [tag for tag in tags if re.search(SCALAR_FILTER, tag)]
    page = browser.new_page(viewport={"width": WIDTH, "height": 1600})
    page.goto(url + "#scalars&_smoothingWeight=0&tagFilter=" + urllib.parse.quote(SCALAR_FILTER, safe=""))
    outliers = page.get_by_role("checkbox", name="Ignore outliers in chart scaling")
    if outliers.is_checked():
        outliers.click()  # show each whole curve
    page.wait_for_load_state("networkidle")
    cards = page.locator("tf-scalar-card")
    cards.nth(len(matching) - 1).wait_for(timeout=LOAD_TIMEOUT * 1000)
    missing = [tag for tag in matching if not page.get_by_text(f"tag: {tag}", exact=True).count()]
    if missing or cards.count() < len(matching):
        raise RuntimeError(f"The SCALARS tab shows {cards.count()} charts but not the ones for {missing}.")
    box = cards.nth(len(matching) - 1).bounding_box()
    assert box is not None
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": WIDTH, "height": box["y"] + box["height"] + 24})
    page.close()
    print(f"{path}: {len(matching)} scalar charts {matching}, {path.stat().st_size // 1024} KB")


def capture(logdir: str, out: Path, chromium: str) -> None:
    """Serve ``logdir`` with TensorBoard and save both screenshots into ``out``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit('Playwright is missing: pip install -e ".[docs]" (no browser download needed)') from None
    run = only_run(logdir)
    out.mkdir(parents=True, exist_ok=True)
    with serve_tensorboard(logdir) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            screenshot_images(browser, url, run, out / "tensorboard.png")
            screenshot_time_series(browser, url, run, out / "tensorboard_time_series.png")
            screenshot_scalars(browser, url, run, out / "tensorboard_scalars.png")
        finally:
            browser.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.logdir is not None:
        capture(args.logdir, Path(args.out), args.chromium)
        return
    from sp_lightning.demo import main as demo

    with tempfile.TemporaryDirectory(prefix="sp_demo_") as logdir:
        demo(["--logdir", logdir])
        capture(logdir, Path(args.out), args.chromium)


if __name__ == "__main__":
    main()
