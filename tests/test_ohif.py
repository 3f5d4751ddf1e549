"""OHIF (the @ohif/app build from npm) in headless Chromium against the archive: open a CT study from the
study list and check that the image is drawn.

Needs Debian's chromium, the `playwright` Python package (driving /usr/bin/chromium; no browser download)
and the OHIF build unpacked under .cache/ohif; `scripts/test-ohif` installs all three and runs this test.
Skipped when any is missing. The viewer is served from its own origin, so CORS is exercised too. The
screenshot is kept in test-artifacts/ohif-ct.png.
"""

from __future__ import annotations

import functools
import http.server
import io
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright import sync_api as playwright_api

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomweb.config import Settings
from tests.fixtures.server import RunningArchive, local_store_archive

ROOT = Path(__file__).resolve().parent.parent
OHIF_DIST = ROOT / ".cache" / "ohif" / "package" / "dist"
CONFIG_TEMPLATE = Path(__file__).parent / "ohif" / "app-config.js"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def browser_prerequisites() -> None:
    """scripts/test installs these (scripts/ohif-deps); missing ones fail loudly rather than skip."""
    if not Path(CHROMIUM).exists():
        pytest.fail("no chromium: run scripts/ohif-deps (scripts/test does)")
    if not (OHIF_DIST / "index.html").exists():
        pytest.fail("no OHIF build under .cache/ohif: run scripts/ohif-deps (scripts/test does)")


class _ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """The OHIF build as static files; our app-config.js; index.html for the app's client-side routes."""

    config: bytes = b""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            self.wfile.write(self.config)
            return
        if not (OHIF_DIST / path.lstrip("/")).is_file():
            self.path = "/index.html"
        super().do_GET()


@pytest.fixture
def viewer_server() -> Iterator[tuple[http.server.ThreadingHTTPServer, str]]:
    handler = functools.partial(_ViewerHandler, directory=str(OHIF_DIST))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cors_archive(database_url: str, tmp_path: Path, viewer_server) -> Iterator[RunningArchive]:
    _, origin = viewer_server
    settings = Settings(data_dir=tmp_path, cors_origins=origin)
    with local_store_archive(settings, database_url, tmp_path) as running:
        yield running


def phantom_ct(count: int = 5, size: int = 256) -> tuple[object, list[bytes]]:
    """A CT series of a water disc in air with a bright rod: obvious when drawn, blank when not."""
    rng = random.Random(5)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    spec.patient_name = "Phantom^Ohif"
    y, x = np.mgrid[0:size, 0:size]
    disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size * 0.4) ** 2
    files = []
    for n in range(1, count + 1):
        ds = make_instance(spec, 0, n, rng=rng, rows=size, columns=size)
        rod = (x - size * (0.3 + 0.08 * n)) ** 2 + (y - size * 0.5) ** 2 < (size * 0.05) ** 2
        hu = np.where(disc, 0, -1000) + np.where(rod, 800, 0)
        ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
        files.append(to_bytes(ds))
    return spec, files


def test_ohif_opens_ct_study_from_study_list(cors_archive: RunningArchive, viewer_server) -> None:
    _server, origin = viewer_server
    _ViewerHandler.config = CONFIG_TEMPLATE.read_bytes().replace(
        b"__DICOMWEB_ROOT__", cors_archive.url.encode()
    )
    _spec, files = phantom_ct()
    body, content_type = multipart_body(files)
    response = httpx.post(f"{cors_archive.url}/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200

    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p, _browser(p) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        failures: list[str] = []
        page.on("requestfailed", lambda r: failures.append(f"{r.url} {r.failure}"))
        page.goto(origin + "/", wait_until="domcontentloaded")
        try:
            row = page.get_by_text("Phantom", exact=False).first
            row.wait_for(timeout=60_000)
            row.click()
            page.get_by_role("button", name="Basic Viewer").first.click(timeout=30_000)
            canvas = page.locator("canvas.cornerstone-canvas, .viewport-element canvas").first
            canvas.wait_for(timeout=60_000)
            image = _wait_for_drawing(page, canvas)
        finally:
            page.screenshot(path=str(ARTIFACTS / "ohif-ct.png"))
        assert not failures, failures
    # the air, the disc and the rod: three clearly different grey levels, not a blank canvas. The levels
    # themselves depend on the window OHIF picks, which under load can be its own rather than the instance's.
    levels = grey_levels(np.asarray(image.convert("L")))
    assert len(levels) >= 3, f"canvas looks blank (grey levels {levels})"
    assert levels[0] < 30, f"no dark air around the disc (grey levels {levels})"


def grey_levels(pixels: np.ndarray, share: float = 0.001, gap: int = 8) -> list[int]:
    """Distinct grey levels that each cover at least `share` of the canvas, merged when closer than `gap`."""
    counts = np.bincount(pixels.ravel(), minlength=256)
    common = [v for v in range(256) if counts[v] >= share * pixels.size]
    levels: list[int] = []
    for value in common:
        if not levels or value - levels[-1] >= gap:
            levels.append(value)
    return levels


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def _wait_for_drawing(page, canvas, timeout_s: float = 60) -> Image.Image:
    """Screenshots of the viewport canvas until it shows an image (the frame loads asynchronously)."""
    deadline = timeout_s * 1000
    waited = 0
    while True:
        image = Image.open(io.BytesIO(canvas.screenshot()))
        if len(grey_levels(np.asarray(image.convert("L")))) >= 3 or waited >= deadline:
            return image
        page.wait_for_timeout(1000)
        waited += 1000
