"""Storage Commitment reports kept in PostgreSQL (dimse/commitment_queue.py): a request accepted by a server
that stops before it could deliver the report is reported by the next server on the database; two servers
on one database deliver each report once; a scanner that is down is retried with back-off; expired
requests are dropped with an audit record. The scanner is a pynetdicom SCP on its registered port."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomcore.uids import new_uid
from dimse import commitment_queue
from indexer.migrate import migrate
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive, free_port, start_dimse_archive
from tests.test_dimse_commitment import Reports, instances, refs_of, scu, send_request


class Scanner(Reports):
    """The modality's own SCP, where the archive sends reports on associations it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.transactions: collections.Counter[str] = collections.Counter()

    def handler(self, event: evt.Event) -> tuple[int, None]:
        self.transactions[str(event.event_information.TransactionUID)] += 1
        return super().handler(event)


@contextmanager
def scanner_listening(port: int, scanner: Scanner) -> Iterator[None]:
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, scanner.handler)]
    )
    try:
        yield
    finally:
        server.shutdown()


def request_and_release(archive: DimseArchive, transaction: str, refs: list[tuple[str, str]]) -> None:
    """The scanner's N-ACTION, and its release right behind it: the report must come on a new association."""
    assoc = scu().associate(*archive.address, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    send_request(assoc, transaction, refs, message_id=7)
    assoc.release()  # the archive handles the N-ACTION (and records it) before it answers the release


def store(archive: DimseArchive, seed: int, count: int) -> list[tuple[str, str]]:
    datasets = instances(seed, count)
    assoc = scu().associate(*archive.address, ae_title=ARCHIVE_AE)
    assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * count
    assoc.release()
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]


async def queued(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT transaction_uid, attempts, last_error, next_attempt_at > now() AS waiting "
            "FROM dimse_commitment ORDER BY commitment_id"
        )
    finally:
        await conn.close()


async def wait_for(database_url: str, done, what: str) -> list[asyncpg.Record]:  # type: ignore[no-untyped-def]
    """Poll the queue until `done(rows)`: the work is in other processes' threads (bounded, not timed)."""
    for _ in range(1200):
        rows = await queued(database_url)
        if done(rows):
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: the queue is {rows}")


async def reports_audited(database_url: str, count: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(100):  # the audit writer flushes every 0.1 s
            rows = await conn.fetch(
                "SELECT status, subject, detail FROM audit_event WHERE path = 'N-EVENT-REPORT' "
                "ORDER BY event_id"
            )
            if len(rows) >= count:
                break
            await asyncio.sleep(0.1)
        return rows
    finally:
        await conn.close()


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [commitment_queue.backoff(n) for n in (1, 2, 3, 4, 9, 10, 40)] == [1, 2, 4, 8, 256, 300, 300]


async def test_a_report_owed_by_a_stopped_server_is_delivered_after_the_restart(
    database_url: str, tmp_path: Path
) -> None:
    scanner_port = free_port()
    thread, first = start_dimse_archive(database_url, tmp_path)
    try:
        await first.register("MODALITY", port=scanner_port, services=["store", "commitment"])
        refs = store(first, 11, 2)
        transaction = new_uid()
        await asyncio.to_thread(request_and_release, first, transaction, refs)
        # the scanner's SCP is down: the attempt on a new association failed and waits for its retry
        rows = await wait_for(
            database_url, lambda rows: rows and rows[0]["attempts"] >= 1, "no failed attempt"
        )
        assert rows[0]["transaction_uid"] == transaction
        assert rows[0]["waiting"] and f"127.0.0.1:{scanner_port}" in rows[0]["last_error"]
    finally:
        thread.stop()  # the server goes before the report could be delivered
    assert [r["transaction_uid"] for r in await queued(database_url)] == [transaction]

    scanner = Scanner()
    with scanner_listening(scanner_port, scanner):
        thread, _ = start_dimse_archive(database_url, tmp_path)
        try:
            await wait_for(database_url, lambda rows: not rows, "the report was not delivered")
        finally:
            thread.stop()
    assert scanner.transactions == {transaction: 1}
    ((event_type, info, requestor),) = scanner.received
    assert requestor.strip() == ARCHIVE_AE
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert refs_of(info, "ReferencedSOPSequence") == [(c, i, None) for c, i in refs]
    audited = await reports_audited(database_url, 1)
    assert [(r["status"], r["subject"]) for r in audited] == [(0, "ae:MODALITY")]
    assert f"sent on a new association to MODALITY at 127.0.0.1:{scanner_port}" in audited[0]["detail"]


async def test_two_servers_on_one_database_deliver_each_report_once(
    database_url: str, tmp_path: Path
) -> None:
    scanner_port = free_port()
    thread_a, a = start_dimse_archive(database_url, tmp_path / "a")
    thread_b, b = start_dimse_archive(database_url, tmp_path / "b")
    try:
        await a.register("MODALITY", port=scanner_port, services=["store", "commitment"])
        refs = store(a, 12, 3)
        transactions = [new_uid() for _ in range(8)]
        for n, transaction in enumerate(transactions):  # half through each server
            await asyncio.to_thread(request_and_release, (a, b)[n % 2], transaction, refs)
        # both servers retry while the scanner is down
        await wait_for(
            database_url, lambda rows: len(rows) == 8 and all(r["attempts"] >= 1 for r in rows), "no retries"
        )
        scanner = Scanner()
        with scanner_listening(scanner_port, scanner):
            await wait_for(database_url, lambda rows: not rows, "reports were not delivered")
    finally:
        thread_a.stop()
        thread_b.stop()
    # a row is deleted only after its report was answered: an empty queue means every send has ended
    assert scanner.transactions == {t: 1 for t in transactions}
    assert all(event_type == 1 for event_type, _, _ in scanner.received)
    audited = await reports_audited(database_url, 8)
    assert sorted(r["detail"].split(":")[0] for r in audited) == sorted(
        f"storage commitment {t}" for t in transactions
    )
    assert {r["status"] for r in audited} == {0}


async def test_an_expired_request_is_dropped_and_audited(database_url: str, tmp_path: Path) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        transaction = new_uid()
        pending = await commitment_queue.enqueue(
            pool, transaction, "MODALITY", "Microsoft.Default", "127.0.0.1", [("1.2.3", "1.2.3.4")]
        )
        await commitment_queue.retry_later(pool, pending, "scanner down")
        # a day later: the retry and the expiry have both passed
        await pool.execute(
            "UPDATE dimse_commitment SET expires_at = now() - interval '1 s', next_attempt_at = now()"
        )
    finally:
        await pool.close()
    scanner = Scanner()
    scanner_port = free_port()
    with scanner_listening(scanner_port, scanner):
        thread, archive = start_dimse_archive(database_url, tmp_path)  # checks expiry as it starts
        try:
            await archive.register("MODALITY", port=scanner_port, services=["commitment"])
            await wait_for(database_url, lambda rows: not rows, "the expired request is still queued")
            audited = await reports_audited(database_url, 1)
        finally:
            thread.stop()
    assert scanner.received == []  # dropped, not sent
    assert [(r["status"], r["subject"]) for r in audited] == [(0x0110, "ae:MODALITY")]
    assert audited[0]["detail"] == (
        f"storage commitment {transaction}: not delivered in 24 h (1 attempts; last: scanner down); dropped"
    )
