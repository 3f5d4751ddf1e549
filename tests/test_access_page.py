"""The data request page in headless Chromium: a researcher submits, a reviewer approves, both see the state.

Needs Debian's chromium and the `playwright` package (driving /usr/bin/chromium; no browser download).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.synthetic import instance_variants, make_study, multipart_body
from tests.access_support import SecureArchive, bearer, hs256, start_secure

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)"),
]


@pytest.fixture
def page_archive(database_url: str, tmp_path: Path) -> Iterator[SecureArchive]:
    archive = start_secure(database_url, tmp_path)
    try:
        yield archive
    finally:
        archive.thread.stop()


def test_submit_and_review_in_the_browser(page_archive: SecureArchive) -> None:
    base = page_archive.running.base
    spec = make_study(random.Random(5), series_count=1)
    body, content_type = multipart_body(instance_variants(spec, 0, 1, start=500))
    owner = bearer(hs256(sub="ops", roles=["owner"]))
    r = httpx.post(
        f"{base}/v2/studies", content=body, headers={"Content-Type": content_type, **owner}, timeout=60
    )
    assert r.status_code == 200
    researcher, reviewer = hs256(sub="rita", roles=["researcher"]), hs256(sub="rev", roles=["reviewer"])
    errors: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: dialog.accept("looks fine"))
            response = page.goto(f"{base}/datarequests/page")
            assert response is not None and response.status == 200
            page.fill("#token", researcher)
            page.click("#use-token")
            page.wait_for_selector("#message:has-text('Signed in')")
            page.fill("#title", "Browser cohort")
            page.fill("#purpose", "Testing the page")
            page.fill("#studies", spec.study_uid)
            page.click("#submit")
            page.wait_for_selector("#message:has-text('Submitted: Browser cohort (submitted)')")
            row = page.locator("#requests tr", has_text="Browser cohort")
            assert row.locator(".state").inner_text() == "submitted"
            assert (
                row.locator("button").count() == 0 or row.locator("button[data-action=approve]").count() == 1
            )
            # the reviewer signs in on the same page and approves (the comment comes from the prompt)
            page.fill("#token", reviewer)
            page.click("#use-token")
            page.wait_for_selector("#message:has-text('Signed in')")
            page.locator("#requests tr", has_text="Browser cohort").locator(
                "button[data-action=approve]"
            ).click()
            page.wait_for_selector("#message:has-text('is now approved')")
            # the export runs; the researcher sees the request become active, with an expiry
            page.fill("#token", researcher)
            page.click("#use-token")
            state = page.locator("#requests tr", has_text="Browser cohort").locator(".state")
            for _ in range(60):
                if state.inner_text() == "active":
                    break
                page.wait_for_timeout(500)
                page.click("#refresh")
            assert state.inner_text() == "active"
            expires = (
                page.locator("#requests tr", has_text="Browser cohort").locator("td").nth(4).inner_text()
            )
            assert expires.startswith("20")
            decision = (
                page.locator("#requests tr", has_text="Browser cohort").locator("td").nth(5).inner_text()
            )
            assert decision == "looks fine"
        finally:
            browser.close()
    assert not errors, errors
