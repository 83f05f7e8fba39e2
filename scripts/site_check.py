"""``make site-check``: open every page of build/site/ in headless Chromium and check what a reader would see.

The site (``python -m lora_course.site``) is served from a localhost ``http.server`` in a thread and each page is
opened with Playwright's Python package driving Debian's Chromium (``/usr/bin/chromium``; never a browser Playwright
downloads). Per page it asserts:

- no console error, no uncaught page error, no failed request, no HTTP error, and no request to another host (every
  request outside the local server is refused and counted: the site must work offline);
- every ``<img>`` decoded with a natural width > 0;
- a notebook page shows at least as many output images as its executed notebook in build/ has image outputs, and its
  closing check's output (the cell tagged ``checks``) is present, visible and not empty;
- its navigation has the course map, the previous and the next chapter where they exist, and the list of chapters;

then follows every navigation link and asserts it opens a page of the site. One full-page screenshot per page goes
to ``build/site-shots/<page>.png``. Ends with a ``site-check: N passed, M failed`` line; exit 1 when a page failed.

    python scripts/site_check.py [--site build/site] [--build build] [--shots build/site-shots]
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

CHROMIUM = os.environ.get("LORA_COURSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

IMAGES_JS = """async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return imgs.map(i => ({complete: i.complete, width: i.naturalWidth, src: i.src.slice(0, 60),
                         output: !!i.closest('.jp-OutputArea-output')}));
}"""
CHECKS_JS = """() => Array.from(document.querySelectorAll('.celltag_checks .jp-OutputArea-output'))
  .map(o => ({text: o.innerText.trim(), visible: !!(o.offsetWidth || o.offsetHeight || o.getClientRects().length)}))"""
NAV_JS = """() => ({
  bar: Array.from(document.querySelectorAll('nav.course-bar a')).map(a => ({href: a.getAttribute('href'),
                                                                           rel: a.getAttribute('rel')})),
  toc: Array.from(document.querySelectorAll('.course-toc a')).map(a => a.getAttribute('href'))})"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the check's output to its findings
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """``site`` over http on 127.0.0.1 (a free port), in a daemon thread; returns the server and its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def expected_pages(build: Path) -> list[tuple[str, int, str | None]]:
    """(page, image outputs its executed notebook has, notebook) for the landing page and each chapter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lora_course.site import find_chapters, image_outputs

    chapters, _ = find_chapters(build)
    pages: list[tuple[str, int, str | None]] = [("index.html", 0, None)]
    for c in chapters:
        nb = json.loads((build / c.notebook).read_text(encoding="utf-8"))
        pages.append((c.page, image_outputs(nb), c.notebook))
    return pages


def check_page(page, url: str, base: str, want_images: int, is_chapter: bool, order: list[str],
               shot: Path) -> tuple[list[str], list[str], str]:
    """Open ``url`` and return (problems, navigation targets, summary)."""
    problems: list[str] = []

    def gate(route):  # only the local server and inline data: nothing from another host
        if route.request.url.startswith((base, "data:")):
            route.continue_()
        else:
            problems.append(f"request to another host (refused): {route.request.url[:200]}")
            route.abort()

    page.route("**/*", gate)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text[:200]}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {str(e)[:200]}"))
    page.on("requestfailed", lambda r: r.url.startswith(base) and problems.append(
        f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    response = page.goto(url, wait_until="load")
    if response is None or response.status != 200:
        return [f"{url} answered {response and response.status}"], [], ""
    page.wait_for_load_state("networkidle")
    images = page.evaluate(IMAGES_JS)
    for img in images:
        if not img["complete"] or img["width"] <= 0:
            problems.append(f"image not decoded (naturalWidth {img['width']}): {img['src']}")
    shown = sum(i["output"] and i["width"] > 0 for i in images)
    if shown < want_images:
        problems.append(f"{shown} output images shown, the executed notebook has {want_images}")
    summary = f"{shown}/{want_images} figures"
    name = urlparse(url).path.rsplit("/", 1)[-1]
    if is_chapter:
        checks = page.evaluate(CHECKS_JS)
        if not checks or not any(c["text"] for c in checks):
            problems.append("the closing check's output (cell tagged 'checks') is missing or empty")
        elif not all(c["visible"] for c in checks):
            problems.append("the closing check's output is hidden")
        else:
            summary += f", closing check {sum(len(c['text'].splitlines()) for c in checks)} lines"
    nav = page.evaluate(NAV_JS)
    rels = {a["rel"]: a["href"] for a in nav["bar"] if a["rel"]}
    i = order.index(name)
    wants = {"index": "index.html"}
    if is_chapter and i > 1:
        wants["prev"] = order[i - 1]
    if is_chapter and i < len(order) - 1:
        wants["next"] = order[i + 1]
    for rel, target in wants.items():
        if rels.get(rel) != target:
            problems.append(f"navigation: {rel} link is {rels.get(rel)!r}, want {target!r}")
    toc = list(nav["toc"])
    if sorted(set(toc)) != sorted(order[1:]):
        problems.append(f"navigation: the chapter list links {toc}, want every chapter {order[1:]}")
    targets = [urljoin(url, a["href"]) for a in nav["bar"]] + [urljoin(url, h) for h in toc]
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    return problems, targets, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", type=Path, default=Path("build/site"))
    p.add_argument("--build", type=Path, default=Path("build"), help="the executed notebooks the site was built from")
    p.add_argument("--shots", type=Path, default=Path("build/site-shots"))
    p.add_argument("--browser", default=CHROMIUM, help="Chromium executable ($LORA_COURSE_CHROMIUM)")
    p.add_argument("--require-figures", action="store_true",
                   help="fail a chapter whose executed notebook has no image output")
    a = p.parse_args(argv)
    if not Path(a.browser).is_file():
        print(f"site-check: no Chromium at {a.browser}: install Debian's package with `apt-get install -y chromium` "
              "(or point --browser / LORA_COURSE_CHROMIUM at a Chromium or Chrome executable)", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("site-check: the playwright package is missing: `make setup` installs the dev extra "
              "(pip install -e '.[dev]'); never `playwright install`, the check uses the system's Chromium",
              file=sys.stderr)
        return 2
    try:
        pages = expected_pages(a.build)
    except (FileNotFoundError, ValueError) as err:
        print(f"site-check: {err}", file=sys.stderr)
        return 2
    missing = [name for name, _, _ in pages if not (a.site / name).is_file()]
    if missing:
        print(f"site-check: {a.site} lacks {missing}: run `make site` first", file=sys.stderr)
        return 2
    order = [name for name, _, _ in pages]
    server, base = serve(a.site)
    failures: dict[str, list[str]] = {}
    external: list[str] = []
    t0 = time.perf_counter()
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="site-check-profile-") as profile:
            context = pw.chromium.launch_persistent_context(profile, executable_path=a.browser, headless=True,
                                                            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})

            def gate(route):  # pages are gated one by one in check_page; this covers the link-following page
                if route.request.url.startswith((base, "data:")):
                    route.continue_()
                else:
                    external.append(route.request.url)
                    route.abort()

            context.route("**/*", gate)
            targets: set[str] = set()
            for name, want, notebook in pages:
                page = context.new_page()
                problems, links, summary = check_page(page, base + name, base, want, notebook is not None, order,
                                                      a.shots / f"{name.removesuffix('.html')}.png")
                page.close()
                if a.require_figures and notebook and not want:
                    problems.append(f"{notebook} has no figure (image output)")
                failures[name] = problems
                targets.update(links)
                print(f"{'ok    ' if not problems else 'FAILED'} {name:36s} {summary}")
                for prob in problems:
                    print(f"         {prob}")
            page = context.new_page()
            for target in sorted(targets):  # follow every navigation link
                path = urlparse(target).path.lstrip("/")
                response = page.goto(target, wait_until="load")
                if not target.startswith(base) or path not in order or response is None or response.status != 200:
                    failures.setdefault("navigation", []).append(
                        f"link {target} does not open a page of the site ({response and response.status})")
            page.close()
            context.close()
    finally:
        server.shutdown()
    if external:
        failures.setdefault("offline", []).append(f"requests to other hosts (refused): {sorted(set(external))[:10]}")
    for extra in ("navigation", "offline"):
        for prob in failures.get(extra, []):
            print(f"FAILED {extra}: {prob}")
    failed = sum(bool(v) for v in failures.values())
    print(f"site-check: screenshots in {a.shots}; {len(targets)} navigation targets followed; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"site-check: {len(failures) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
