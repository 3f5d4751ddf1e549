"""Series retrieval and rendered JPEG, A/B: two or more checkouts measured in interleaved rounds.

    python -m bench.wado_series [--code base=../base] [--code branch=.] [--rows 128] [--rounds 6]

The data and the clients are bench.peers' (one series of `--per-study` CT instances per study, `--clients`
curl processes each reading every series `--passes` times, multipart with transfer-syntax=*). Every checkout
named by `--code NAME=DIR` gets its own `dicomweb serve` on its defaults (the server imports DIR's packages)
and the same data; then the rounds alternate between them (A B B A A B ...), so that the shared machine's
load falls on all alike. Per round and checkout it prints MB/s, the CPU milliseconds per MB of the server's
process tree (workers and PostgreSQL), the load average, and how the clients' connections fell on the
worker processes, which moves MB/s more than most changes do (see connections_per_process); then the median
of `--rendered` rendered JPEGs (bench.peers' figure: one instance of each series in turn, sequential on one
connection) and the server's CPU an image. On 2 cores shared with the clients, CPU per MB and per image are
the figures that the rest of the machine does not move.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import archive_processes, embedded_archive, tree_cpu_seconds
from bench.peers import (
    JPEG,
    check_series_parts,
    data_set_arguments,
    latencies,
    make_dataset,
    retrieval,
    retrieve_series,
    series_paths,
    stow,
)


def _checkouts(values: list[str]) -> dict[str, Path]:
    named = {}
    for value in values or ["branch=."]:
        name, _, path = value.partition("=")
        named[name] = Path(path or ".").resolve()
    return named


def connections_per_process(root: str) -> list[int]:
    """How the clients' connections to `root` are spread over the server's worker processes (ss): the
    workers share one listening socket, and whichever wakes first accepts, so 4 keep-alive clients on 2
    workers often end up 3 + 1 or 4 + 0, and one worker then carries most of the round."""
    port = httpx.URL(root).port
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
    ).stdout
    return sorted(collections.Counter(re.findall(r"pid=(\d+)", out)).values())


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    data_set_arguments(parser, studies=40, rows=128)
    parser.add_argument("--code", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--passes", type=int, default=3, help="retrievals of every series per client a round")
    parser.add_argument("--rendered", type=int, default=200, help="rendered JPEG requests a round")
    parser.add_argument("--workers", type=int, help="server processes (default: the server's, one per core)")
    args = parser.parse_args()
    checkouts = _checkouts(args.code)
    data = make_dataset(args.studies, args.per_study, args.rows)
    size = data.instance_bytes / 1024
    print(f"data: {args.studies} studies x {args.per_study} CT instances of {size:.0f} KiB")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
    images: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
    rendered = [
        f"{series}/instances/{sops[len(sops) // 2]}/rendered"
        for series, sops in zip(series_paths(data), data.sop_uids, strict=True)
    ]
    with contextlib.ExitStack() as stack:
        roots, dirs = {}, {}
        for name, code in checkouts.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"dicomweb-ab-{name}-")))
            root = stack.enter_context(
                embedded_archive(
                    workers=args.workers, data_dir=tmp, extra_args=["--dimse-port", "0"], code=code
                )
            )
            stow(root, data, args.clients)
            check_series_parts(root, data)
            retrieval(root, data, args.clients)  # warm: page cache, connections, imports
            roots[name], dirs[name] = root, tmp
        names = list(checkouts)
        for n in range(args.rounds):
            order = names if n % 2 == 0 else names[::-1]
            for name in order:
                pids = archive_processes(roots[name], dirs[name])
                cpu = tree_cpu_seconds(pids)
                with ThreadPoolExecutor(1) as pool:
                    running = pool.submit(retrieve_series, roots[name], data, args.clients, args.passes)
                    time.sleep(0.3)  # the clients are connected: which worker took which connection
                    spread = connections_per_process(roots[name])
                    total, elapsed = running.result()
                megabytes = total / 1e6
                cpu_ms = (tree_cpu_seconds(pids) - cpu) * 1000
                results[name].append((megabytes / elapsed, cpu_ms / megabytes))
                cpu = tree_cpu_seconds(pids)
                times = latencies(roots[name], rendered, JPEG, args.rendered)
                cpu_ms = (tree_cpu_seconds(pids) - cpu) * 1000
                images[name].append((statistics.median(times), cpu_ms / len(times)))
                rate, cost = results[name][-1]
                load = f"load {os.getloadavg()[0]:.2f}"
                print(
                    f"round {n + 1} {name}: {rate:.0f} MB/s, {cost:.2f} CPU ms/MB ({load}, connections per "
                    f"worker {spread}); rendered JPEG median {images[name][-1][0]:.2f} ms, "
                    f"{images[name][-1][1]:.2f} CPU ms an image",
                    flush=True,
                )
    for name, rows in results.items():
        rates, costs = [r for r, _ in rows], [c for _, c in rows]
        medians, per_image = [m for m, _ in images[name]], [c for _, c in images[name]]
        print(
            f"{name}: median {statistics.median(rates):.0f} MB/s ({min(rates):.0f}-{max(rates):.0f}), "
            f"{statistics.median(costs):.2f} CPU ms/MB ({min(costs):.2f}-{max(costs):.2f}); rendered "
            f"{statistics.median(medians):.2f} ms ({min(medians):.2f}-{max(medians):.2f}), "
            f"{statistics.median(per_image):.2f} CPU ms an image"
        )


if __name__ == "__main__":
    main()
