"""GET /metrics: request counters by handler, STOW outcomes, and archive gauges read from PostgreSQL."""

from __future__ import annotations

import random
import re

import httpx

from bench.synthetic import instance_variants, make_study, multipart_body
from tests.fixtures.server import RunningArchive


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text format (0 when absent: counters start there)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


async def test_counters_and_gauges(local_archive: RunningArchive) -> None:
    async with httpx.AsyncClient(base_url=local_archive.base, timeout=30) as client:
        before = (await client.get("/metrics")).text
        spec = make_study(random.Random(3), series_count=1)
        files = instance_variants(spec, 0, 4)
        body, content_type = multipart_body(files)
        assert (
            await client.post("/v2/studies", content=body, headers={"Content-Type": content_type})
        ).status_code == 200
        body, content_type = multipart_body(files[:1])
        assert (
            await client.post("/v2/studies", content=body, headers={"Content-Type": content_type})
        ).status_code == 409
        for _ in range(3):
            assert (await client.get("/v2/studies")).status_code == 200
        assert (await client.get("/v2/studies/1.2.3.999")).status_code == 404
        assert (await client.get("/nowhere")).status_code == 404

        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        after = response.text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert (
        delta("dicomweb_http_requests_total", handler="qido.search_studies", method="GET", status="200") == 3
    )
    assert (
        delta("dicomweb_http_requests_total", handler="stow.store_instances", method="POST", status="200")
        == 1
    )
    assert (
        delta("dicomweb_http_requests_total", handler="stow.store_instances", method="POST", status="409")
        == 1
    )
    assert delta("dicomweb_http_requests_total", handler="wado.retrieve", method="GET", status="404") == 1
    assert delta("dicomweb_http_requests_total", handler="unmatched", method="GET", status="404") == 1
    assert (
        delta("dicomweb_http_request_duration_seconds_count", handler="qido.search_studies", method="GET")
        == 3
    )
    assert delta("dicomweb_stow_instances_total", outcome="stored") == 4
    assert delta("dicomweb_stow_instances_total", outcome="already_stored") == 1
    # gauges describe this archive's database, not the process
    assert sample(after, "dicomweb_instances") == 4
    assert sample(after, "dicomweb_studies") == 1
    assert sample(after, "dicomweb_changefeed_last_sequence") == 4
    assert sample(after, "dicomweb_partitions") == 1
