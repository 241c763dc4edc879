"""Open every page of the built docs site in headless Chromium and fail on what a reader would hit.

Usage (after ``mkdocs build``)::

    python tools/docs_browser_check.py --site site --screenshots site-check

Serves ``site/`` on a loopback port, opens each HTML page in Debian's ``chromium`` driven by
Selenium and ``chromedriver``, and fails when a page logs a console error, links to a page or
anchor-less file of the site that does not exist, or shows an image that did not load. Saves
screenshots of the home page and of one API reference page. Needs ``apt-get install chromium
chromium-driver`` and ``pip install selenium``; ``nox -s docs-browser`` runs it.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urlparse

SCREENSHOTS = {"index.html": "home.png", "api/adaattn-linalg/index.html": "api-adaattn-linalg.png"}
# Chromium flags for a closed network: no background traffic, no sandbox as root, no GPU.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1366,900",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``site`` on 127.0.0.1 (a free port) in a daemon thread; return server and base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def driver() -> object:
    """A headless Chromium WebDriver with browser console logs enabled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def check_page(browser: object, base: str, site: Path, page: str) -> list[str]:
    """Problems a reader would meet on ``page`` (path relative to the site root)."""
    from selenium.webdriver.common.by import By

    problems: list[str] = []
    browser.get(base + page)  # type: ignore[attr-defined]
    for entry in browser.get_log("browser"):  # type: ignore[attr-defined]
        if entry.get("level") == "SEVERE":
            problems.append(f"{page}: console error: {entry.get('message')}")
    for img in browser.find_elements(By.TAG_NAME, "img"):  # type: ignore[attr-defined]
        loaded = browser.execute_script(  # type: ignore[attr-defined]
            "return arguments[0].complete && arguments[0].naturalWidth > 0;", img
        )
        if not loaded:
            problems.append(f"{page}: image did not load: {img.get_attribute('src')}")
    for link in browser.find_elements(By.TAG_NAME, "a"):  # type: ignore[attr-defined]
        href = link.get_attribute("href") or ""
        url, _ = urldefrag(href)
        if not url.startswith(base):
            continue  # external links are not followed from a closed network
        target = site / urlparse(url).path.lstrip("/")
        if target.is_dir() or not target.suffix:
            target = target / "index.html"
        if not target.exists():
            problems.append(f"{page}: broken internal link {href}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=Path("site"))
    parser.add_argument("--screenshots", type=Path, default=Path("site-check"))
    args = parser.parse_args()
    site = args.site.resolve()
    pages = sorted(str(p.relative_to(site)) for p in site.rglob("*.html") if p.name != "404.html")
    if not pages:
        print(f"no HTML pages under {site}: run `mkdocs build` first", file=sys.stderr)
        return 2
    args.screenshots.mkdir(parents=True, exist_ok=True)
    server, base = serve(site)
    browser = driver()
    problems: list[str] = []
    try:
        for page in pages:
            problems += check_page(browser, base, site, page)
            if page in SCREENSHOTS:
                browser.save_screenshot(str(args.screenshots / SCREENSHOTS[page]))  # type: ignore[attr-defined]
    finally:
        browser.quit()  # type: ignore[attr-defined]
        server.shutdown()
    for problem in problems:
        print("FAIL", problem)
    print(f"{len(pages)} pages opened, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
