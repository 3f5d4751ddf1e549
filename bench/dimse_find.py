"""C-FIND latency at scale: the QIDO-RS study shapes asked over DIMSE, on the data set of bench.qido_search.

    python -m bench.qido_search load --data-dir bench/out/qido --studies 100000   # once: 1M instances
    python -m bench.dimse_find --data-dir bench/out/qido [--rounds 200]

Starts `dicomweb serve` on that data directory with its DIMSE listener (--insecure-open, so any calling AE
is accepted), opens one association (Study Root C-FIND, as a workstation keeps one open) and times each query
from the request to the final response, all pending responses read, printing p50/p95/max per query shape. The
keys are those of bench.qido_search's shapes, with the attributes a study-level QIDO returns by default as
return keys, so the two benches ask the index the same questions.

The shapes cut at 100 or 50 matches (a C-CANCEL then, as a viewer showing one screen sends) are also timed to
that last match shown ("shown" columns). The final response comes after the matches the archive sent before
it read the C-CANCEL; how many depends on how much faster the archive sends them than this client, a
pynetdicom SCU, reads them ("max rows").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from bench.common import embedded_archive, free_port, percentile
from bench.synthetic import DESCRIPTIONS, FAMILY
from dimse.pacing import make_responsive
from dimse.scu import keep_reactor_off_queue
from indexer.embedded import EmbeddedPostgres

RETURN_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName", "PatientName",
    "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyInstanceUID", "StudyDescription",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)  # fmt: skip


def shapes(rng: random.Random, sample: list[dict]) -> dict[str, dict[str, str]]:
    """Matching keys per query shape, as bench.qido_search's study queries."""
    row = rng.choice(sample)
    year, month = rng.randint(2000, 2025), rng.randint(1, 12)
    return {
        "PatientID exact": {"PatientID": row["patient_id"]},
        "AccessionNumber exact": {"AccessionNumber": row["accession_number"]},
        "StudyInstanceUID": {"StudyInstanceUID": row["study_instance_uid"]},
        "PatientName prefix* (100)": {"PatientName": f"{rng.choice(FAMILY)[:3]}*"},
        "StudyDate month range (100)": {"StudyDate": f"{year}{month:02d}01-{year}{month:02d}28"},
        "ModalitiesInStudy + date (100)": {"ModalitiesInStudy": "MR", "StudyDate": f"{year}0101-{year}1231"},
        "StudyDescription* + date (50)": {
            "StudyDescription": f"{rng.choice(DESCRIPTIONS)[:4]}*",
            "StudyDate": f"{year}0101-",
        },
    }


def identifier(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, keys.get(keyword, ""))
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def limit_of(name: str) -> int | None:
    """The shapes QIDO pages at 100 or 50 are cut there too (C-CANCEL after that many), as a viewer would."""
    return int(name.rsplit("(", 1)[1].rstrip(")")) if name.endswith(")") else None


def run(port: int, sample: list[dict], rounds: int) -> None:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMWEB")
    if not assoc.is_established:
        raise SystemExit("association refused")
    # read each match as it arrives, as DCMTK's findscu does: pynetdicom's own pace (a 1 ms sleep whenever
    # its DUL thread finds nothing to do) made this client the bound at ~0.7-1 ms a match
    keep_reactor_off_queue(assoc)
    make_responsive(assoc)
    rng = random.Random(1)
    timings: dict[str, list[float]] = {}
    shown: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    try:
        for n in range(rounds + 5):
            for name, keys in shapes(rng, sample).items():
                limit = limit_of(name)
                started = time.perf_counter()
                count, cut = 0, 0.0
                responses = assoc.send_c_find(identifier(keys), StudyRootQueryRetrieveInformationModelFind)
                for status, _ in responses:
                    if status is None or status.Status not in (0xFF00, 0xFF01):
                        break
                    count += 1
                    if limit is not None and count == limit:
                        cut = time.perf_counter()
                        assoc.send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelFind)
                if n >= 5:  # warm-up rounds: plans, caches
                    timings.setdefault(name, []).append((time.perf_counter() - started) * 1000)
                    if cut:
                        shown.setdefault(name, []).append((cut - started) * 1000)
                    rows[name] = max(rows.get(name, 0), count)
    finally:
        assoc.release()
    print(f"{'C-FIND, STUDY level':34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'max rows':>9}"
          f" {'shown p50':>10} {'shown p95':>10}")  # fmt: skip
    for name, values in timings.items():
        cut = shown.get(name)
        at_cut = f" {percentile(cut, 50):10.1f} {percentile(cut, 95):10.1f}" if cut else ""
        print(
            f"{name:34} {percentile(values, 50):8.1f} {percentile(values, 95):8.1f} "
            f"{max(values):8.1f} {rows[name]:9d}{at_cut}"
        )


async def _sample(dsn: str) -> list[dict]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT patient_id, accession_number, study_instance_uid
               FROM study TABLESAMPLE SYSTEM (1) LIMIT 2000"""
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/qido"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None, help="archive processes (default: one per core)")
    args = parser.parse_args()
    port = free_port()
    # as bench.qido_search measure: the data set's PostgreSQL, the archive on it as an external database
    with (
        EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg,
        embedded_archive(
            workers=args.workers,
            data_dir=args.data_dir.resolve(),
            database_url=pg.dsn,
            extra_args=["--dimse-port", str(port)],
        ),
    ):
        run(port, asyncio.run(_sample(pg.dsn)), args.rounds)


if __name__ == "__main__":
    main()
