"""How soon one node sees what another did: three `dicomweb serve` nodes on one PostgreSQL and one bucket.

    python -m bench.scale_out [--nodes 3] [--samples 50]

Starts a PostgreSQL on loopback TCP (as nodes on other machines reach it), SeaweedFS, and the nodes as
tests/test_scale_out.py does (tests/fixtures/nodes.py: one worker each, access control on), then measures,
`--samples` times each, with the change on node A and the observer on node B:

- revocation: DELETE /tokens/{id} answered on A, until a request with the token is refused on B (B had the
  token cached; it polls every millisecond);
- UPS-RS event: from sending a state change to A until a WebSocket subscriber on B receives its event;
- change feed wake-up: from sending a one-instance STOW to A until a long-poll (`wait=10`) on B returns it;
- visibility: from the STOW's answer on A until a QIDO on B has found the instance (the first query
  after the answer must find it);
- hand-over (`--handovers` times): an update of about 1,000 instances through A, its holder SIGKILLed after
  its first committed step; seconds until another node claimed it (the nodes' lease is 3 s) and until it
  succeeded.

It prints p50, p95 and max of each, with the load average before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
from websockets.asyncio.client import connect

from access import tokens
from access.clock import Clock
from bench.common import free_port, percentile
from bench.deid_export import weed
from bench.synthetic import instance_variants, make_study, multipart_body
from bench.ups_synthetic import workitem
from dicomcore.uids import new_uid
from indexer.embedded import EmbeddedPostgres
from tests.fixtures.nodes import Cluster
from tests.fixtures.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server

WORKLIST = "1.2.840.10008.5.1.4.34.5"
LEASE_SECONDS = 3  # DICOMWEB_OPERATION_LEASE_SECONDS of the nodes (production: 30)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def line(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name:<22} p50 {percentile(ms, 50):7.1f} ms   p95 {percentile(ms, 95):7.1f} ms   "
            f"max {max(ms):7.1f} ms   (n={len(ms)})")  # fmt: skip


async def revocation(a: str, b: str, owner: dict[str, str], samples: int) -> list[float]:
    delays = []
    async with httpx.AsyncClient(timeout=30) as http:
        for n in range(samples):
            r = await http.post(f"{a}/tokens", json={"role": "reader", "name": f"bench-{n}"}, headers=owner)
            token = {"Authorization": f"Bearer {r.json()['token']}"}
            for _ in range(2):  # B looks it up and caches it
                assert (await http.get(f"{b}/v2/studies?limit=1", headers=token)).status_code == 200
            assert (await http.delete(f"{a}/tokens/{r.json()['id']}", headers=owner)).status_code == 204
            revoked = time.perf_counter()
            while True:
                if (await http.get(f"{b}/v2/studies?limit=1", headers=token)).status_code == 401:
                    break
                await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - revoked)
    return delays


async def ups_events(a: str, b: str, owner: dict[str, str], samples: int) -> list[float]:
    json_type = {**owner, "Content-Type": "application/dicom+json"}
    delays = []
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{b}/v2/workitems/{WORKLIST}/subscribers/BENCH_AE", headers=owner)
        assert r.status_code == 201, r.text
        async with connect(r.headers["content-location"], additional_headers=owner) as ws:
            for _ in range(samples):
                uid = new_uid()
                r = await http.post(f"{a}/v2/workitems?{uid}", headers=json_type,
                                    content=orjson.dumps([workitem(station=None)]))  # fmt: skip
                assert r.status_code == 201, r.text
                await _event(ws)  # its creation
                claim = {"00741000": {"vr": "CS", "Value": ["IN PROGRESS"]},
                         "00081195": {"vr": "UI", "Value": [new_uid()]}}  # fmt: skip
                sent = time.perf_counter()
                r = await http.put(f"{a}/v2/workitems/{uid}/state", content=orjson.dumps([claim]),
                                   headers=json_type)  # fmt: skip
                assert r.status_code == 200, r.text
                await _event(ws)
                delays.append(time.perf_counter() - sent)
    return delays


async def _event(ws: object) -> None:
    event = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=30))  # type: ignore[attr-defined]
    await ws.send(orjson.dumps({"ack": event["00771001"]["Value"][0]}).decode())  # type: ignore[attr-defined]


async def feed_and_visibility(
    a: str, b: str, owner: dict[str, str], samples: int
) -> tuple[list[float], list[float]]:
    wakes, visible = [], []
    async with httpx.AsyncClient(timeout=60) as http:
        for n in range(samples):
            spec = make_study(random.Random(n), series_count=1)
            body, content_type = multipart_body(instance_variants(spec, 0, 1, start=n, rows=16, columns=16))
            r = await http.get(f"{b}/v1/changefeed/latest", headers=owner)
            after = r.json()["Sequence"]
            poll = asyncio.create_task(http.get(f"{b}/v1/changefeed", headers=owner, params={
                "offset": after, "wait": 10, "includemetadata": "false"}))  # fmt: skip
            await asyncio.sleep(0.05)  # the long-poll is waiting on B
            sent = time.perf_counter()
            r = await http.post(
                f"{a}/v2/studies", content=body, headers={**owner, "Content-Type": content_type}
            )
            assert r.status_code == 200, r.text
            stored = time.perf_counter()
            woken = await poll
            assert woken.json()[0]["StudyInstanceUid"] == spec.study_uid
            wakes.append(time.perf_counter() - sent)
            found = await http.get(
                f"{b}/v2/studies", params={"StudyInstanceUID": spec.study_uid}, headers=owner
            )
            assert len(found.json()) == 1  # the first query after the answer already finds it
            visible.append(time.perf_counter() - stored)
    return wakes, visible


async def handover(cluster: Cluster, owner: dict[str, str], count: int) -> tuple[float, float]:
    """An update of `count` instances through A; SIGKILL its holder after its first committed step. Seconds
    from the kill until another node has claimed it, and until it succeeded."""
    spec = make_study(random.Random(count), series_count=1)
    files = instance_variants(spec, 0, count, start=20_000_000 + count * 10_000, rows=16, columns=16)
    a = cluster.nodes[0]
    async with httpx.AsyncClient(timeout=120, headers=owner) as http:
        for part in range(0, count, 200):
            body, content_type = multipart_body(files[part : part + 200])
            r = await http.post(f"{a.url}/studies", content=body, headers={"Content-Type": content_type})
            assert r.status_code == 200, r.text
        change = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Bench^{count}"}]}}
        body = {"studyInstanceUids": [spec.study_uid], "changeDataset": change}
        r = await http.post(f"{a.url}/studies/$bulkUpdate", json=body)
        op = uuid.UUID(r.json()["id"])
        conn = await asyncpg.connect(cluster.database_url)
        try:
            query = "SELECT status, leased_by, checkpoint FROM operation WHERE operation_id = $1"
            while True:  # its first step committed
                row = await conn.fetchrow(query, op)
                if row["checkpoint"] is not None and row["leased_by"] is not None:
                    break
                await asyncio.sleep(0.01)
            holder = row["leased_by"]
            victim = next(n for n in cluster.nodes if n.pid == int(holder.split(":")[1]))
            cluster.kill(victim)
            killed = time.perf_counter()
            claimed = None
            while (row := await conn.fetchrow(query, op))["status"] != "succeeded":
                if claimed is None and row["leased_by"] not in (None, holder):
                    claimed = time.perf_counter() - killed
                await asyncio.sleep(0.01)
            finished = time.perf_counter() - killed
        finally:
            await conn.close()
    await asyncio.to_thread(cluster.start)  # the killed node again
    return claimed if claimed is not None else finished, finished


async def measure(cluster: Cluster, samples: int, handovers: int) -> None:
    conn = await asyncpg.connect(cluster.database_url)
    try:
        owner_text, _ = await tokens.create(conn, "owner", now=Clock().now(), name="bench-owner")
    finally:
        await conn.close()
    owner = {"Authorization": f"Bearer {owner_text}"}
    a, b = cluster.nodes[0].base, cluster.nodes[1].base
    print(f"load before: {load()}")
    print(line("revocation A->B", await revocation(a, b, owner, samples)))
    print(line("UPS-RS event A->B", await ups_events(a, b, owner, samples)))
    wakes, visible = await feed_and_visibility(a, b, owner, samples)
    print(line("change feed wake A->B", wakes))
    print(line("QIDO on B after STOW A", visible))
    for n in range(handovers):
        claimed, finished = await handover(cluster, owner, 1024 + n)
        print(
            f"hand-over {n + 1}: claimed by another node {claimed:.2f} s after the SIGKILL (lease "
            f"{LEASE_SECONDS} s, poll 2 s), update of {1024 + n} instances done {finished:.2f} s after"
        )
    print(f"load after: {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--handovers", type=int, default=3, help="updates whose node is killed midway")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicomweb-bench-scale-out-"))
    try:
        with (
            EmbeddedPostgres(root / "pg", port=free_port(), fast_unsafe=True) as postgres,
            weed(root / "weed") as (endpoint, bucket),
        ):
            database_url = f"postgresql://postgres@127.0.0.1:{postgres.port}/dicomweb"
            s3 = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, REGION)
            cluster = Cluster.create(args.nodes, database_url, f"s3://{bucket}/{uuid.uuid4().hex}", s3,
                                     root / "nodes")  # fmt: skip
            cluster.lease_seconds = LEASE_SECONDS
            try:
                cluster.start()
                print(f"{args.nodes} nodes on one PostgreSQL (TCP) and one SeaweedFS bucket, one worker each")
                asyncio.run(measure(cluster, args.samples, args.handovers))
            finally:
                cluster.stop_all()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
