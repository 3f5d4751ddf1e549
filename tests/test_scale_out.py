"""Three `dicomweb serve` nodes on one PostgreSQL and one S3 bucket behave as one archive.

Each node is a separate process with its own HTTP and DIMSE ports (tests/fixtures/nodes.py), as separate
machines would be; access control is on. The tests show that what one node does is seen at once by the
others: stored instances, the change feed (exactly once, with writers on every node), background operations
(run once, and handed over when the node running one is killed or stopped), token revocation, UPS-RS events,
the DIMSE listener and its AE registry, an extended query tag added while other nodes store, and the audit
log's one hash chain.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from websockets.asyncio.client import connect

from access.commands import verify_audit
from bench.synthetic import instance_variants, make_instance, make_study, multipart_body
from dicomcore.uids import new_uid
from tests.access_support import bearer, make_token
from tests.fixtures.nodes import TEST_LEASE_SECONDS, Cluster, Node
from tests.fixtures.postgres import fresh_database
from tests.fixtures.s3 import S3Server
from tests.worklist_data import workitem

WORKLIST = "1.2.840.10008.5.1.4.34.5"
DICOM_ANY = {"Accept": "application/dicom; transfer-syntax=*"}
DICOM_JSON = {"Content-Type": "application/dicom+json"}
REVOCATION_DEADLINE = 1.0


@dataclass
class Archive:
    cluster: Cluster
    owner: str  # an owner's API token, valid on every node

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def client(self, node: Node, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=node.url, headers=bearer(token or self.owner), timeout=60)


@pytest.fixture(scope="module")
async def scale_out(
    postgres_server: str, s3_server: S3Server, s3_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Archive]:
    async with fresh_database(postgres_server) as database_url:
        storage_url = f"s3://{s3_bucket}/scale-out-{uuid.uuid4().hex}"
        cluster = Cluster.create(3, database_url, storage_url, s3_server, tmp_path_factory.mktemp("nodes"))
        try:
            await asyncio.to_thread(cluster.start)  # all three at once: their migrations race
            owner, _ = await make_token(database_url, "owner", name="scale-out-owner")
            yield Archive(cluster, owner)
        finally:
            await asyncio.to_thread(cluster.stop_all)


@pytest.fixture
async def archive(scale_out: Archive) -> Archive:
    """The module's nodes, every one running (a test that killed one has it started again)."""
    await asyncio.to_thread(scale_out.cluster.start)
    return scale_out


def study_files(seed: int, count: int, series: int = 1) -> tuple[str, list[bytes]]:
    spec = make_study(random.Random(seed), series_count=series)
    files = [
        f
        for s in range(series)
        for f in instance_variants(spec, s, count, start=(seed * 10 + s) * 1000, rows=16, columns=16)
    ]
    return spec.study_uid, files


async def stow(client: httpx.AsyncClient, files: list[bytes]) -> list[str]:
    """Store files in one request; their SOP Instance UIDs as the archive answered."""
    body, content_type = multipart_body(files)
    r = await client.post("/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    return [item["00081155"]["Value"][0] for item in r.json()["00081199"]["Value"]]


def sop_uids(results: list[dict[str, Any]]) -> list[str]:
    return sorted(item["00080018"]["Value"][0] for item in results)


def v1(client: httpx.AsyncClient) -> str:
    """The v1 root of a client's node (the change feed's sequence offsets are v1's)."""
    return str(client.base_url.copy_with(path="/v1"))


async def feed(client: httpx.AsyncClient, after: int, *, wait: int = 0) -> list[dict[str, Any]]:
    """v1 change feed entries after sequence `after` (one page of up to 10,000)."""
    params = {"offset": after, "limit": 10_000, "includemetadata": "false"}
    if wait:
        params["wait"] = wait
    r = await client.get(v1(client) + "/changefeed", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def latest_sequence(client: httpx.AsyncClient) -> int:
    r = await client.get(v1(client) + "/changefeed/latest")
    assert r.status_code == 200, r.text
    return r.json()["Sequence"]


async def wait_operation(client: httpx.AsyncClient, href: str) -> dict[str, Any]:
    async with asyncio.timeout(90):
        while True:
            r = await client.get(href)
            if r.status_code == 200:
                return r.json()
            assert r.status_code == 202, r.text
            await asyncio.sleep(0.1)


async def bulk_update(client: httpx.AsyncClient, studies: list[str], name: str) -> str:
    """Queue an update of PatientName; the operation's id."""
    body = {"studyInstanceUids": studies,
            "changeDataset": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]}}}  # fmt: skip
    r = await client.post("/studies/$bulkUpdate", content=orjson.dumps(body),
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def test_an_instance_stored_through_one_node_is_found_and_retrieved_through_the_others(
    archive: Archive,
) -> None:
    a, b, c = archive.nodes
    study, files = study_files(1, 4)
    async with archive.client(a) as on_a, archive.client(b) as on_b, archive.client(c) as on_c:
        stored = await stow(on_a, files)
        # at once: no wait, no retry
        for other in (on_b, on_c):
            r = await other.get("/studies", params={"StudyInstanceUID": study})
            assert r.status_code == 200, r.text
            assert [s["00201208"]["Value"] for s in r.json()] == [[4]]
            r = await other.get(f"/studies/{study}/instances")
            assert sop_uids(r.json()) == sorted(stored)
            for sop, data in zip(stored, files, strict=True):
                r = await other.get(f"/studies/{study}/instances", params={"SOPInstanceUID": sop})
                series = r.json()[0]["0020000E"]["Value"][0]
                r = await other.get(f"/studies/{study}/series/{series}/instances/{sop}", headers=DICOM_ANY)
                assert r.status_code == 200, r.text
                assert r.content == data
        # a delete through one node is seen by the others at once too
        series = (await on_c.get(f"/studies/{study}/series")).json()[0]["0020000E"]["Value"][0]
        gone = f"/studies/{study}/series/{series}/instances/{stored[0]}"
        assert (await on_c.delete(gone)).status_code == 204
        for other in (on_a, on_b):
            assert (await other.get(gone, headers=DICOM_ANY)).status_code == 404
            r = await other.get(f"/studies/{study}/instances")
            assert sop_uids(r.json()) == sorted(stored[1:])


async def test_the_change_feed_is_exactly_once_with_writers_on_every_node(archive: Archive) -> None:
    """Three writers per node store concurrently while a reader on one node follows the feed by sequence;
    the reader sees every create exactly once, in dense increasing order, as a later full read does."""
    writers_per_node, requests, per_request = 3, 4, 5
    clients = [archive.client(node) for node in archive.nodes]
    reader_client = archive.client(archive.nodes[1])
    try:
        start = await latest_sequence(clients[0])
        expected = len(clients) * writers_per_node * requests * per_request
        done = asyncio.Event()

        async def writer(client: httpx.AsyncClient, seed: int) -> list[str]:
            stored: list[str] = []
            for request in range(requests):
                _, files = study_files(seed * 100 + request, per_request)
                stored += await stow(client, files)
            return stored

        async def reader() -> list[dict[str, Any]]:
            """A consumer that pages by sequence while the writers commit (long-polling when caught up)."""
            seen: list[dict[str, Any]] = []
            after = start
            while len(seen) < expected:
                page = await feed(reader_client, after, wait=0 if done.is_set() else 2)
                if page:
                    seen += page
                    after = page[-1]["Sequence"]
                elif done.is_set():
                    break
            return seen

        reading = asyncio.create_task(reader())
        try:
            stored_lists = await asyncio.gather(
                *(writer(client, 100 + n * 10 + w) for n, client in enumerate(clients)
                  for w in range(writers_per_node))
            )  # fmt: skip
            done.set()
            followed = await asyncio.wait_for(reading, 60)
        finally:
            reading.cancel()
        stored = [sop for batch in stored_lists for sop in batch]
        assert len(stored) == len(set(stored)) == expected

        final = await feed(clients[2], start)
        assert [e["Sequence"] for e in final] == list(range(start + 1, start + expected + 1))
        assert {e["Action"] for e in final} == {"create"}
        assert collections.Counter(e["SopInstanceUid"] for e in final) == collections.Counter(stored)
        assert followed == final  # the live reader missed nothing and saw nothing twice
    finally:
        for client in (*clients, reader_client):
            await client.aclose()


async def test_operations_run_once_across_nodes(archive: Archive) -> None:
    """Updates queued through every node: each runs exactly once, whichever node claims it."""
    a, b, c = archive.nodes
    async with archive.client(a) as on_a, archive.client(b) as on_b, archive.client(c) as on_c:
        clients = (on_a, on_b, on_c)
        studies: list[tuple[str, list[str]]] = []
        for n, client in enumerate(clients):
            study, files = study_files(200 + n, 5, series=2)
            studies.append((study, await stow(client, files)))
        start = await latest_sequence(on_a)
        operations = [
            await bulk_update(client, [study], f"Updated^Through{node.name.upper()}")
            for client, node, (study, _) in zip(clients, archive.nodes, studies, strict=True)
        ]
        for n, op in enumerate(operations):
            done = await wait_operation(clients[(n + 1) % 3], f"/operations/{op}")
            assert done["status"] == "succeeded", done
            assert done["results"] == {"studyUpdated": 1, "studyFailed": 0, "instanceUpdated": 10}
        entries = await feed(on_b, start)
        assert [e["Sequence"] for e in entries] == list(range(start + 1, start + 31))
        assert {e["Action"] for e in entries} == {"update"}
        stored = [sop for _, sops in studies for sop in sops]
        assert collections.Counter(e["SopInstanceUid"] for e in entries) == collections.Counter(stored)
        for (study, _), node in zip(studies, archive.nodes, strict=True):
            r = await on_c.get("/instances", params={"StudyInstanceUID": study, "includefield": "00100010"})
            names = {i["00100010"]["Value"][0]["Alphabetic"] for i in r.json()}
            assert names == {f"Updated^Through{node.name.upper()}"}


async def operation_row(database_url: str, op: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            """SELECT status, leased_by, leased_until, attempts, checkpoint FROM operation
               WHERE operation_id = $1""",
            uuid.UUID(op),
        )
        assert row is not None
        return row
    finally:
        await conn.close()


@dataclass
class HandOver:
    lease_end: dt.datetime  # when the lease of the node that was stopped would have run out
    claimed_at: dt.datetime  # when another node claimed the operation (PostgreSQL's clock, as both)


async def update_and_stop_its_node(archive: Archive, seed: int, stop: Callable[[Node], None]) -> HandOver:
    """Queue an update of 800 instances (four steps), stop the node holding it after its first committed
    step, and check that another node finishes it: every instance updated exactly once (one change feed
    entry each, dense), none left half-done or with its old name."""
    a = archive.nodes[0]
    count, database_url = 800, archive.cluster.database_url
    async with archive.client(a) as on_a:
        study, files = study_files(seed, count // 4, series=4)
        stored: list[str] = []
        for part in range(0, len(files), 200):
            stored += await stow(on_a, files[part : part + 200])
        start = await latest_sequence(on_a)
        op = await bulk_update(on_a, [study], f"Handed^Over{seed}")
        async with asyncio.timeout(60):
            while True:  # its first step committed: the operation is half-done
                row = await operation_row(database_url, op)
                assert row["status"] in ("notStarted", "running"), dict(row)
                if row["checkpoint"] is not None and row["leased_by"] is not None:
                    break
                await asyncio.sleep(0.02)
    holder = next(node for node in archive.nodes if node.pid == int(row["leased_by"].split(":")[1]))
    stopping = asyncio.create_task(asyncio.to_thread(stop, holder))
    async with asyncio.timeout(60):
        while True:  # until another node holds it
            claimed = await operation_row(database_url, op)
            if claimed["leased_by"] not in (None, row["leased_by"]):
                break
            await asyncio.sleep(0.01)
    await stopping
    # a claim sets leased_until to its time plus the lease (steps renew it later: this errs late)
    hand_over = HandOver(
        row["leased_until"], claimed["leased_until"] - dt.timedelta(seconds=TEST_LEASE_SECONDS)
    )
    survivor = next(node for node in archive.nodes if node is not holder)
    async with archive.client(survivor) as on_survivor:
        done = await wait_operation(on_survivor, f"/operations/{op}")
        assert done["status"] == "succeeded", done
        assert done["results"] == {"studyUpdated": 1, "studyFailed": 0, "instanceUpdated": count}
        assert (await operation_row(database_url, op))["attempts"] == 2  # the stopped node, then one other
        entries = await feed(on_survivor, start)
        assert [e["Sequence"] for e in entries] == list(range(start + 1, start + count + 1))
        assert collections.Counter(e["SopInstanceUid"] for e in entries) == collections.Counter(stored)
        results = []
        for offset in (0, 500):
            params = {"StudyInstanceUID": study, "includefield": "00100010", "limit": 500, "offset": offset}
            results += (await on_survivor.get("/instances", params=params)).json()
        assert sop_uids(results) == sorted(stored)
        assert {i["00100010"]["Value"][0]["Alphabetic"] for i in results} == {f"Handed^Over{seed}"}
    return hand_over


async def test_a_node_killed_mid_operation_hands_it_over_when_its_lease_runs_out(archive: Archive) -> None:
    """SIGKILL (a crash): the node cannot say it is gone, so the operation waits for its lease."""
    hand_over = await update_and_stop_its_node(archive, 300, archive.cluster.kill)
    assert hand_over.claimed_at >= hand_over.lease_end


async def test_a_node_stopped_mid_operation_hands_it_over_at_once(archive: Archive) -> None:
    """SIGTERM (a rolling restart): the node releases its lease as it stops, so another node takes the
    operation over before the lease would have run out."""
    hand_over = await update_and_stop_its_node(archive, 310, archive.cluster.stop)
    assert hand_over.claimed_at < hand_over.lease_end


async def test_a_token_revoked_on_one_node_is_refused_on_the_others_within_a_second(archive: Archive) -> None:
    a, b, c = archive.nodes
    async with archive.client(a) as on_a:
        r = await on_a.post(f"{a.base}/tokens", json={"role": "reader", "name": "short-lived"})
        assert r.status_code == 201, r.text
        token, token_id = r.json()["token"], r.json()["id"]
    readers = [archive.client(node, token) for node in (b, c)]
    try:
        for reader in readers:  # each node has now looked the token up, and caches it
            for _ in range(2):
                assert (await reader.get("/studies")).status_code == 200
        async with archive.client(a) as on_a:
            r = await on_a.delete(f"{a.base}/tokens/{token_id}")
            assert r.status_code == 204
        revoked_at = time.monotonic()

        async def refused_after(reader: httpx.AsyncClient) -> float:
            while True:
                r = await reader.get("/studies")
                if r.status_code == 401:
                    assert r.json() == {"error": {"code": 401, "message": "token revoked"}}
                    return time.monotonic() - revoked_at
                assert r.status_code == 200
                assert time.monotonic() - revoked_at < REVOCATION_DEADLINE, "still accepted after 1 s"
                await asyncio.sleep(0.01)

        delays = await asyncio.gather(*(refused_after(reader) for reader in readers))
        assert all(delay < REVOCATION_DEADLINE for delay in delays), delays
    finally:
        for reader in readers:
            await reader.aclose()


def summary(event: dict[str, Any]) -> tuple[str, int, str | None]:
    """(work item, event type, state) of an event report."""
    state = event.get("00741000", {}).get("Value", [None])[0]
    return event["00001000"]["Value"][0], event["00001002"]["Value"][0], state


async def test_ups_events_reach_a_websocket_subscriber_on_another_node(archive: Archive) -> None:
    a, b, c = archive.nodes
    ae = "SCALE_OUT_AI"
    async with archive.client(a) as on_a, archive.client(b) as on_b, archive.client(c) as on_c:
        r = await on_b.post(f"/workitems/{WORKLIST}/subscribers/{ae}")
        assert r.status_code == 201, r.text
        url = r.headers["content-location"]
        assert url == f"ws://127.0.0.1:{b.port}/v2/ws/subscribers/{ae}"
        async with connect(url, additional_headers=bearer(archive.owner)) as ws:
            uid, tuid = new_uid(), new_uid()
            r = await on_a.post(f"/workitems?{uid}", content=orjson.dumps([workitem(station=None)]),
                                headers=DICOM_JSON)  # fmt: skip
            assert r.status_code == 201, r.text
            claim = {"00741000": {"vr": "CS", "Value": ["IN PROGRESS"]},
                     "00081195": {"vr": "UI", "Value": [tuid]}}  # fmt: skip
            r = await on_c.put(f"/workitems/{uid}/state", content=orjson.dumps([claim]), headers=DICOM_JSON)
            assert r.status_code == 200, r.text
            events = []
            for _ in range(2):
                event = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
                events.append(event)
                await ws.send(orjson.dumps({"ack": event["00771001"]["Value"][0]}).decode())
            assert [summary(e) for e in events] == [(uid, 1, "SCHEDULED"), (uid, 1, "IN PROGRESS")]
            assert [e["00771001"]["Value"][0] for e in events] == [1, 2]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), timeout=0.5)


def echo_and_store(node: Node, datasets: list[Any]) -> tuple[int, list[int]]:
    """C-ECHO and C-STORE to a node's DIMSE listener, as the registered AE SCANNER (pynetdicom)."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="DICOMWEB")
    assert assoc.is_established, f"node {node.name} refused the association"
    try:
        echo = assoc.send_c_echo().Status
        return echo, [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


async def test_the_dimse_listener_works_on_every_node(archive: Archive) -> None:
    a = archive.nodes[0]
    async with archive.client(a) as on_a:
        r = await on_a.post(f"{a.base}/aes", json={"aeTitle": "SCANNER", "host": "127.0.0.1",
                                                   "services": ["store"]})  # fmt: skip
        assert r.status_code in (200, 201), r.text
    for n, node in enumerate(archive.nodes):
        rng = random.Random(400 + n)
        spec = make_study(rng, series_count=1, modalities=["CT"])
        datasets = [make_instance(spec, 0, i + 1, rng=rng, rows=16, columns=16) for i in range(2)]
        echo, statuses = await asyncio.to_thread(echo_and_store, node, datasets)
        assert (echo, statuses) == (0, [0, 0])
        other = archive.nodes[(n + 1) % len(archive.nodes)]
        async with archive.client(other) as on_other:
            r = await on_other.get(f"/studies/{spec.study_uid}/instances")
            assert r.status_code == 200, r.text
            assert sop_uids(r.json()) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    # the registry is read per association: an AE removed through one node is refused by every other at once
    async with archive.client(archive.nodes[1]) as on_b:
        assert (await on_b.delete(f"{archive.nodes[1].base}/aes/SCANNER")).status_code == 204
    for node in archive.nodes:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", node.dimse_port, ae_title="DICOMWEB")
        assert assoc.is_rejected, f"node {node.name} admitted a removed AE"


async def test_the_audit_log_of_every_node_is_one_intact_chain(archive: Archive) -> None:
    """Every node's audit writer appends to one hash chain (under an advisory lock), so requests to all
    nodes at once leave a chain that `dicomweb audit verify` proves, with every request's record in it."""
    marker = new_uid()  # a study nobody stored: each request is a 404, audited with this study UID
    per_node = 40
    clients = [archive.client(node) for node in archive.nodes]
    try:

        async def requests(client: httpx.AsyncClient) -> None:
            for _ in range(per_node):
                assert (await client.get(f"/studies/{marker}/metadata")).status_code == 404

        await asyncio.gather(*(requests(client) for client in clients for _ in range(2)))
    finally:
        for client in clients:
            await client.aclose()
    expected = 2 * per_node * len(clients)
    conn = await asyncpg.connect(archive.cluster.database_url)
    try:
        async with asyncio.timeout(10):  # each node writes its buffer every 0.1 s
            while True:
                written = await conn.fetchval("SELECT count(*) FROM audit_event WHERE study_uid = $1", marker)
                if written >= expected:
                    break
                await asyncio.sleep(0.1)
        assert written == expected
    finally:
        await conn.close()
    verdict = await verify_audit(archive.cluster.database_url)
    assert verdict.intact, verdict
    assert verdict.before_chain == 0


async def test_an_extended_query_tag_added_on_one_node_while_the_others_store(archive: Archive) -> None:
    """Adding a tag waits for writes in flight on every node (INGEST_LOCK is PostgreSQL's), so each instance
    gets its value exactly once: from the re-index (any node's) if it was committed before, from its own
    write if after."""
    a, b, c = archive.nodes
    requests, per_request = 8, 5
    async with archive.client(a) as on_a, archive.client(b) as on_b, archive.client(c) as on_c:
        added = asyncio.Event()

        async def writer(client: httpx.AsyncClient, seed: int) -> dict[str, list[str]]:
            studies: dict[str, list[str]] = {}
            for request in range(requests):
                if request == 2:
                    await added.wait()  # the tag is added while these requests run and before the rest
                study, files = study_files(seed * 100 + request, per_request)
                studies[study] = await stow(client, files)
            return studies

        writing = [asyncio.create_task(writer(client, seed)) for client, seed in ((on_b, 500), (on_c, 510))]
        await asyncio.sleep(0.2)
        r = await on_a.post("/extendedquerytags", json=[{"Path": "SliceThickness", "Level": "Instance"}])
        assert r.status_code == 202, r.text
        added.set()
        written = await asyncio.gather(*writing)
        done = await wait_operation(on_c, r.json()["href"].removeprefix(a.url))
        assert done["status"] == "succeeded", done
        stored = {study: sops for studies in written for study, sops in studies.items()}
        assert len(stored) == 2 * requests
        for study, sops in stored.items():
            r = await on_b.get(f"/studies/{study}/instances", params={"SliceThickness": "1.25"})
            assert r.status_code == 200, r.text
            assert sop_uids(r.json()) == sorted(sops)
            r = await on_a.get(f"/studies/{study}/instances", params={"SliceThickness": "2.5"})
            assert r.json() == []
    conn = await asyncpg.connect(archive.cluster.database_url)
    try:
        tag = await conn.fetchval("SELECT tag_key FROM extended_query_tag WHERE path = '00180050'")
        values, rows, instances = await conn.fetchrow(
            """SELECT count(*), count(DISTINCT row_key), (SELECT count(*) FROM instance)
               FROM ext_double WHERE tag_key = $1""",
            tag,
        )
    finally:
        await conn.close()
    assert values == rows == instances  # every instance of the archive once, none twice
