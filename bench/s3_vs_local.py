"""The S3 store beside the local store: the same data through two archives, measured interleaved.

    python -m bench.s3_vs_local [--studies 16] [--per-study 50] [--rows 512] [--rounds 4] [--exports 5]

Starts SeaweedFS (`weed mini`, the test suite's S3 server) on loopback and `dicomweb serve` twice, both as
the README runs it (embedded PostgreSQL, as many workers as cores): once on its default local store, once
with `--storage-url s3://bench/archive --s3-endpoint-url ...`. Both know the endpoint, so both can export
to S3. Then, alternating between the two archives so that the machine's load falls on both alike:

- STOW-RS ingest: the studies in `--rounds` slices, each slice into both archives (`--clients` clients,
  one study per request; bench.peers.stow), instances/s;
- series retrieval: `--rounds` passes of `--clients` curl clients reading every series (bench.peers), MB/s;
- de-identified export (POST /export of every study, basic profile plus Retain Longitudinal Modified
  Dates), after a few untimed ones that start the servers' process pools: `--exports` runs of each of
  local store to a directory, local store to S3, S3 store to S3, S3 store to a directory; instances/s
  from the POST to the operation's success.

It prints each figure, the ratio local / S3 (1.0: S3 as fast) per round and its median, the CPU time
each took in the archive's processes (server, workers, PostgreSQL, de-identifying pool) and in
SeaweedFS, per instance or per MB, and the load average around each measurement: the machine is
shared, so single figures move; the ratios of neighbouring runs move much less.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from bench.common import archive_processes, embedded_archive, processes_with, tree_cpu_seconds
from bench.deid_export import weed
from bench.peers import PeerData, data_set_arguments, make_dataset, retrieval, stow

BUCKET = "bench"  # created by bench.deid_export.weed


def slices(data: PeerData, count: int) -> list[PeerData]:
    """The data set cut into `count` parts of whole studies, each to be stored into both archives."""
    return [
        PeerData(data.studies[n::count], data.bodies[n::count], data.sop_uids[n::count], data.instance_bytes)
        for n in range(count)
    ]


def export(root: str, studies: list[str], destination: dict, expected: int) -> float:
    """Instances/s of one export operation, from its POST to its success (polled every 20 ms)."""
    body = {
        "source": {"type": "identifiers", "settings": {"values": studies}},
        "destination": destination,
        "deidentification": {"project": "bench", "options": ["retainLongModifiedDates"]},
    }
    with httpx.Client(timeout=60) as http:
        start = time.perf_counter()
        r = http.post(f"{root}/export", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"export to {destination} failed: {r.status_code} {r.text[:300]}")
        href = r.json()["href"]
        while True:
            op = http.get(href).json()
            if op["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
    if op["status"] != "succeeded" or op["results"].get("exported") != expected:
        raise RuntimeError(f"export to {destination}: {op['status']} {op['results']}")
    return expected / elapsed


def load() -> float:
    return os.getloadavg()[0]


def roots_of(url: str, data_dir: Path, weed_dir: Path) -> dict[str, set[int]]:
    """The archive's processes: `dicomweb serve` on url's port (its workers and de-identifying processes are
    its descendants) and its PostgreSQL (a daemon: not one); and SeaweedFS, run from weed_dir."""
    flag = f"-dir={weed_dir / 'data'}".encode()
    return {
        "archive": archive_processes(url, data_dir),
        "weed": processes_with(lambda args: b"mini" in args and flag in args),
    }


def compare(
    name: str,
    unit: str,
    rounds: int,
    measure: Callable[[str, int], float],
    roots: dict[str, str],
    processes: dict[str, dict[str, set[int]]],
    per: tuple[str, Callable[[int], float]],
) -> dict[str, list[float]]:
    """`rounds` of measure(root, round) on each archive, local first; prints each pair, the ratio and the
    CPU each took (per unit of work: per[1](round) units of per[0]) in the archive and in SeaweedFS."""
    values: dict[str, list[float]] = {"local": [], "s3": []}
    for n in range(rounds):
        loads, cpu = [load()], []
        for store in ("local", "s3"):
            groups = processes[store]
            before = {group: tree_cpu_seconds(pids) for group, pids in groups.items()}
            values[store].append(measure(roots[store], n))
            loads.append(load())
            used = {
                group: 1000 * (tree_cpu_seconds(pids) - before[group]) / per[1](n)
                for group, pids in groups.items()
            }
            cpu.append(f"{store} archive {used['archive']:.2f} + SeaweedFS {used['weed']:.2f}")
        local, s3 = values["local"][-1], values["s3"][-1]
        print(
            f"  {name} round {n + 1}: local {local:.1f} {unit}, S3 {s3:.1f} {unit}, "
            f"local/S3 {local / s3:.2f} (load average {min(loads):.1f}-{max(loads):.1f}); "
            f"CPU ms per {per[0]}: {', '.join(cpu)}",
            flush=True,
        )
    return values


def summary(name: str, unit: str, values: dict[str, list[float]]) -> str:
    ratios = [a / b for a, b in zip(values["local"], values["s3"], strict=True)]
    local, s3 = statistics.median(values["local"]), statistics.median(values["s3"])
    ratio = statistics.median(ratios)
    return f"| {name} | {unit} | {local:.1f} | {s3:.1f} | {ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"


@contextlib.contextmanager
def archives(endpoint: str, tmp: Path) -> Iterator[dict[str, str]]:
    """Both archives on their defaults, the second on the S3 store; yields their /v2 roots by store."""
    common = ["--dimse-port", "0", "--s3-endpoint-url", endpoint]
    s3 = [*common, "--storage-url", f"s3://{BUCKET}/archive"]
    with (
        embedded_archive(workers=None, data_dir=tmp / "local", extra_args=common) as local_root,
        embedded_archive(workers=None, data_dir=tmp / "s3", extra_args=s3) as s3_root,
    ):
        yield {"local": local_root, "s3": s3_root}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    data_set_arguments(parser, studies=16, rows=512)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of STOW and retrieval")
    parser.add_argument("--exports", type=int, default=5, help="runs of each export")
    args = parser.parse_args()
    data = make_dataset(args.studies, args.per_study, args.rows)
    parts = slices(data, args.rounds)
    print(
        f"data: {args.studies} studies x {args.per_study} CT instances of "
        f"{data.instance_bytes / 1024:.0f} KiB, {os.cpu_count()} cores, load average {load():.1f}",
        flush=True,
    )
    table = ["| figure | unit | local store | S3 store | local / S3, median (range) |", "|---" * 5 + "|"]
    with tempfile.TemporaryDirectory(prefix="s3-vs-local-") as scratch:
        tmp = Path(scratch)
        with weed(tmp / "weed") as (endpoint, _), archives(endpoint, tmp) as roots:
            processes = {store: roots_of(root, tmp / store, tmp / "weed") for store, root in roots.items()}
            instance = ("instance", lambda n: parts[n].instances)
            values = compare(
                "STOW-RS ingest", "instances/s", args.rounds,
                lambda root, n: stow(root, parts[n], args.clients), roots, processes, instance,
            )  # fmt: skip
            table.append(summary("STOW-RS ingest", "instances/s", values))
            megabytes = ("MB", lambda n: args.clients * data.instances * data.instance_bytes / 1e6)
            values = compare(
                "series retrieval", "MB/s", args.rounds,
                lambda root, n: retrieval(root, data, args.clients), roots, processes, megabytes,
            )  # fmt: skip
            table.append(summary("series retrieval (multipart, transfer-syntax=*)", "MB/s", values))
            studies = [s.study_uid for s in data.studies]
            # untimed: start each server process's de-identification pool, as a running server has it
            # (the operation goes to whichever of its processes claims it first, so a few runs)
            for root in roots.values():
                for n in range(3):
                    warm = {"type": "directory", "settings": {"path": f"warm{n}"}}
                    export(root, studies[:1], warm, len(data.sop_uids[0]))
            exports = {}
            for label, destination in (
                ("to a directory", lambda n: {"type": "directory", "settings": {"path": f"run{n}"}}),
                ("to S3", lambda n: {"type": "s3", "settings": {"bucket": BUCKET, "prefix": f"run{n}"}}),
            ):
                exports[label] = compare(
                    f"export {label}", "instances/s", args.exports,
                    lambda root, n, to=destination: export(root, studies, to(n), data.instances), roots,
                    processes, ("instance", lambda n: data.instances),
                )  # fmt: skip
                name = f"de-identified export {label}, median of {args.exports}"
                table.append(summary(name, "instances/s", exports[label]))
            # each store to its own kind of destination: the local archive's export beside the S3 one's
            each = {"local": exports["to a directory"]["local"], "s3": exports["to S3"]["s3"]}
            table.append(summary("export: local store to a directory / S3 store to S3", "instances/s", each))
    print("\n".join(table))


if __name__ == "__main__":
    main()
