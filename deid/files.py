"""`dicomweb deidentify IN OUT --project P`: the export engine applied to files on disk.

Each input file is read, de-identified and written by a worker process (both cores), which sends back
only a short outcome. Output: OUT/{study}/{series}/{sop}.dcm (de-identified UIDs). Skipped and failed
files are reported as JSON lines on stderr or in --errors FILE, never in OUT: they name the source files,
whose paths may themselves identify patients. Likewise the pseudonym/original mapping is written only where
--mapping says, never beside the data: it re-identifies.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import orjson

from deid.engine import Deidentifier, Skipped
from deid.keys import ProjectKeys, read_secret_file
from deid.mapping import valid_project
from deid.profile import Options, ProfileError, build_plan, pixel_rules_from_json
from deid.table import OPTION_CODES


@dataclass(frozen=True, slots=True)
class FileOutcome:
    source: str
    kind: str  # exported, skipped, failed
    detail: str  # output path, or the reason
    mapping: tuple[tuple[str, str, str, str], ...] = ()  # (kind, pseudonym, original, issuer)


def default_secret_file(project: str) -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "dicomweb" / "deid" / f"{project}.secret"


def input_files(source: Path, out: Path | None = None) -> Iterator[Path]:
    """The files under `source`, except those under `out` (an output directory inside the input one holds
    de-identified copies, which are not inputs: a rerun would de-identify them again)."""
    if source.is_file():
        yield source
        return
    skip = out.resolve() if out is not None else None
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if skip is None or (Path(root) / d).resolve() != skip)
        for name in sorted(files):
            yield Path(root) / name


_engine: Deidentifier | None = None


def _init(engine: Deidentifier) -> None:
    global _engine
    _engine = engine


def _one(path: Path, out: Path) -> FileOutcome:
    assert _engine is not None
    try:
        result = _engine(path.read_bytes())
    except Skipped as exc:
        return FileOutcome(str(path), "skipped", str(exc))
    except Exception as exc:
        return FileOutcome(str(path), "failed", f"de-identification failed ({exc.__class__.__name__}: {exc})")
    target = out / result.new.study / result.new.series / f"{result.new.sop}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    # written whole under a name of its own, then linked in place only if nothing is there: two inputs
    # with one SOP Instance UID never overwrite each other (nor race on one temporary name)
    partial = target.parent / f".{result.new.sop}.{secrets.token_hex(8)}.part"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask decides
    try:
        with open(fd, "wb") as f:
            f.write(result.data)
        try:
            os.link(partial, target)
        except FileExistsError:
            if target.read_bytes() != result.data:  # the same output (a rerun) counts as exported
                return FileOutcome(
                    str(path),
                    "skipped",
                    f"another input with the same SOP Instance UID was written to {target}",
                )
    finally:
        os.unlink(partial)
    o, n = result.original, result.new
    rows = (
        ("patient", n.patient_id, o.patient_id, o.issuer),
        ("study", n.study, o.study, ""),
        ("series", n.series, o.series, ""),
        ("instance", n.sop, o.sop, ""),
    )
    return FileOutcome(str(path), "exported", str(target), rows)


def run(
    source: Path,
    out: Path,
    *,
    project: str,
    secret_file: Path | None,
    options: list[str],
    pixel_rules: Path | None,
    jobs: int,
    mapping_file: Path | None,
    errors_file: Path | None = None,
) -> dict[str, int]:
    secret_path = secret_file or default_secret_file(project)
    created = not secret_path.exists()
    secret = read_secret_file(secret_path, create=True)
    if created:
        print(f"created a new secret for project {project!r} in {secret_path}", file=sys.stderr)
    rules = pixel_rules_from_json(orjson.loads(pixel_rules.read_bytes())) if pixel_rules else []
    engine = Deidentifier(build_plan(Options.from_names(options), rules), ProjectKeys(project, secret))
    out.mkdir(parents=True, exist_ok=True)
    counts = {"exported": 0, "skipped": 0, "failed": 0}
    seen: set[tuple[str, str]] = set()
    with (
        _private(errors_file, os.O_TRUNC)
        if errors_file
        else open(sys.stderr.fileno(), "wb", closefd=False) as errors,
        _private(mapping_file, os.O_APPEND) if mapping_file else open(os.devnull, "wb") as mapping,
    ):
        for outcome in _outcomes(engine, source, out, jobs):
            counts[outcome.kind] += 1
            if outcome.kind != "exported":
                line = {"Timestamp": datetime.now(UTC).isoformat(), "Identifier": outcome.source,
                        "Error": outcome.detail, "Kind": outcome.kind}  # fmt: skip
                errors.write(orjson.dumps(line) + b"\n")
            for kind, pseudonym, original, issuer in outcome.mapping:
                if (kind, pseudonym) not in seen:
                    seen.add((kind, pseudonym))
                    row = {"project": project, "kind": kind, "pseudonym": pseudonym, "original": original}
                    mapping.write(orjson.dumps({**row, "issuer": issuer} if issuer else row) + b"\n")
    return counts


def _private(path: Path, mode: int) -> BinaryIO:
    """A report file only its owner may read, as the project secret: the mapping re-identifies, and the
    errors name source paths. Created mode 0600; an existing file keeps the mode its owner gave it."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | mode, 0o600), "wb")


def _outcomes(engine: Deidentifier, source: Path, out: Path, jobs: int) -> Iterator[FileOutcome]:
    files = input_files(source, out)
    if jobs <= 1:
        _init(engine)
        for path in files:
            yield _one(path, out)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init, initargs=(engine,)) as pool:
        yield from pool.map(_one, files, _repeat(out), chunksize=16)


def _repeat(value: Path) -> Iterator[Path]:
    while True:
        yield value


def add_deidentify_command(sub: argparse._SubParsersAction) -> None:
    """`dicomweb deidentify` (registered by dicomweb.cli)."""
    cmd = sub.add_parser("deidentify", help="de-identify DICOM files on disk (PS3.15 Annex E, as exports do)")
    cmd.add_argument("source", type=Path, metavar="IN", help="a DICOM file or a directory of them")
    cmd.add_argument("out", type=Path, metavar="OUT", help="output directory: OUT/{study}/{series}/{sop}.dcm")
    cmd.add_argument("--project", required=True, help="the project: its secret keys UIDs and pseudonyms")
    cmd.add_argument(
        "--secret-file", type=Path, help="the project's secret (default ~/.config/dicomweb/deid/P.secret)"
    )
    cmd.add_argument(
        "--option", action="append", default=[], metavar="NAME",
        help="a profile option, repeatable: " + ", ".join(OPTION_CODES),
    )  # fmt: skip
    cmd.add_argument("--pixel-rules", type=Path, metavar="FILE", help="JSON list of pixel-cleaning rules")
    cmd.add_argument(
        "--mapping", type=Path, metavar="FILE", help="append pseudonym/original rows (JSON lines)"
    )
    cmd.add_argument(
        "--errors", type=Path, metavar="FILE", help="write skipped/failed files here (JSON lines; stderr)"
    )
    cmd.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (2)")
    cmd.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    if not valid_project(args.project):
        print("error: --project must be 1-64 letters, digits, '_', '.', '-'", file=sys.stderr)
        return 2
    if not args.source.exists():
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    if args.out.resolve() == args.source.resolve():
        print("error: OUT must not be IN: its outputs would be read as inputs", file=sys.stderr)
        return 2
    try:
        counts = run(
            args.source, args.out, project=args.project, secret_file=args.secret_file, options=args.option,
            pixel_rules=args.pixel_rules, jobs=args.jobs, mapping_file=args.mapping, errors_file=args.errors,
        )  # fmt: skip
    except (ProfileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {counts['exported']}, skipped {counts['skipped']}, failed {counts['failed']}")
    return 1 if counts["failed"] else 0
