"""`dicomweb deidentify IN OUT --project P`: files on disk through the same engine as exports."""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pydicom
import pytest

from deid.engine import Deidentifier
from deid.keys import ProjectKeys, read_secret_file
from deid.profile import Options, build_plan
from tests.deid_data import Canaries, base_instance, leaked, nested, to_file


def write_inputs(root: Path) -> tuple[list[Path], Canaries]:
    canaries = Canaries(random.Random(21))
    study, series = canaries.uid(), canaries.uid()
    paths = []
    for n in range(5):
        ds = base_instance(canaries, study=study, series=series, sop=canaries.uid(), patient="P-21")
        ds.StudyDescription = canaries.text()
        ds.AcquisitionContextSequence = [nested(canaries, 3)]
        path = root / "in" / f"sub{n % 2}" / f"{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_file(ds, canaries))
        paths.append(path)
    us = base_instance(canaries, study=study, series=series, sop=canaries.uid(), patient="P-21")
    us.Modality = "SC"
    (root / "in" / "screen.dcm").write_bytes(to_file(us, canaries))
    (root / "in" / "notes.txt").write_text("not DICOM")
    return paths, canaries


def deidentify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomweb.cli", "deidentify", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_deidentify_files(tmp_path: Path) -> None:
    paths, canaries = write_inputs(tmp_path)
    secret = tmp_path / "p.secret"
    mapping = tmp_path / "mapping.jsonl"
    out = tmp_path / "out"
    args = [
        "--project",
        "cli-p",
        "--secret-file",
        secret,
        "--option",
        "clean_descriptors",
        "--mapping",
        mapping,
        "--errors",
        tmp_path / "errors.jsonl",
    ]
    done = deidentify(tmp_path / "in", out, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exported 5, skipped 2, failed 0"
    assert "created a new secret for project 'cli-p'" in done.stderr
    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == 5
    engine = Deidentifier(
        build_plan(Options(clean_descriptors=True)), ProjectKeys("cli-p", read_secret_file(secret))
    )
    expected = {}
    for path in paths:
        result = engine(path.read_bytes())
        expected[out / result.new.study / result.new.series / f"{result.new.sop}.dcm"] = result.data
    assert {p: p.read_bytes() for p in outputs} == expected  # the same engine, byte for byte
    for data in expected.values():
        assert leaked(canaries.made, data) == []
        assert pydicom.dcmread(io.BytesIO(data)).PatientIdentityRemoved == "YES"
    # skips are reported outside OUT: they name source paths, which may identify patients
    assert sorted(p.suffix for p in out.rglob("*") if p.is_file()) == [".dcm"] * 5
    errors = [orjson.loads(line) for line in (tmp_path / "errors.jsonl").read_bytes().splitlines()]
    assert sorted((Path(e["Identifier"]).name, e["Kind"]) for e in errors) == [
        ("notes.txt", "skipped"), ("screen.dcm", "skipped")]  # fmt: skip
    rows = [orjson.loads(line) for line in mapping.read_bytes().splitlines()]
    assert sorted(r["kind"] for r in rows) == ["instance"] * 5 + ["patient", "series", "study"]
    assert {r["original"] for r in rows if r["kind"] == "patient"} == {"P-21"}
    # the mapping re-identifies and the errors name source paths: only their owner reads them, as the
    # secret (both were created 0644 under the usual umask, readable by every local user)
    assert {stat.S_IMODE(f.stat().st_mode) for f in (mapping, tmp_path / "errors.jsonl", secret)} == {0o600}
    # the mapping never lands beside the data
    assert b"P-21" not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    # again with the same secret: the same files
    again = deidentify(tmp_path / "in", tmp_path / "again", "--project", "cli-p", "--secret-file", secret,
                       "--option", "clean_descriptors", "--jobs", "1")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert '"Kind":"skipped"' in again.stderr  # without --errors: JSON lines on stderr
    assert sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.dcm")) == sorted(
        p.relative_to(out) for p in outputs
    )


def test_deidentify_rejects_bad_arguments(tmp_path: Path) -> None:
    done = deidentify(tmp_path / "missing", tmp_path / "out", "--project", "p")
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "in").mkdir()
    done = deidentify(tmp_path / "in", tmp_path / "out", "--project", "p", "--option", "retainAll",
                      "--secret-file", tmp_path / "s")  # fmt: skip
    assert done.returncode == 2 and "unknown de-identification option 'retainAll'" in done.stderr
    # IN as OUT: each rerun de-identified the outputs of the last one again (exported 1, then 2, ...)
    done = deidentify(
        tmp_path / "in", tmp_path / "in" / ".", "--project", "p", "--secret-file", tmp_path / "s"
    )
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "error: OUT must not be IN: its outputs would be read as inputs",
    )


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_two_inputs_with_one_sop_instance_uid_are_not_overwritten(tmp_path: Path, jobs: str) -> None:
    """Two input files with the same SOP Instance UID (the same image stored twice, pydicom's test files
    have many) de-identify to the same output path: the later silently replaced the earlier, and the
    summary counted both as exported (pydicom's test files: 'exported 115' for 98 files). The first
    written stays; the other is reported skipped with the reason; a rerun into the same OUT finds its
    own identical output and counts it exported again."""
    canaries = Canaries(random.Random(22))
    ds = base_instance(canaries, study=canaries.uid(), series=canaries.uid(), sop=canaries.uid(), patient="P")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(to_file(ds, canaries))
    ds.SliceThickness = "2.5"  # the same instance, one more kept attribute: another output
    (tmp_path / "in" / "b.dcm").write_bytes(to_file(ds, canaries))
    secret, out, errors = tmp_path / "s", tmp_path / "out", tmp_path / "errors.jsonl"
    args = ["--project", "p", "--secret-file", secret, "--errors", errors, "--jobs", jobs]
    for _ in range(2):  # the rerun into the same OUT answers the same
        done = deidentify(tmp_path / "in", out, *args)
        assert (done.returncode, done.stdout.strip()) == (0, "exported 1, skipped 1, failed 0"), done.stderr
        outputs = list(out.rglob("*"))
        assert [p.suffix for p in outputs if p.is_file()] == [".dcm"]  # no temporary file left behind
        lines = [orjson.loads(line) for line in errors.read_bytes().splitlines()]
        assert [(Path(e["Identifier"]).name, e["Kind"]) for e in lines] == [("b.dcm", "skipped")]
        assert lines[0]["Error"].startswith("another input with the same SOP Instance UID was written to ")
    written = next(p for p in out.rglob("*.dcm"))
    assert "SliceThickness" not in pydicom.dcmread(written)  # a.dcm's, the first
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~_umask()  # outputs are as readable as before


def test_an_output_directory_inside_the_input_is_not_read_as_input(tmp_path: Path) -> None:
    """`dicomweb deidentify IN IN/out`: a rerun walked IN/out too and de-identified the earlier outputs
    again (exported 2, then 4, then 6: copies of copies under new UIDs); OUT is never an input."""
    paths, _ = write_inputs(tmp_path)
    out = tmp_path / "in" / "zz-out"
    args = ["--project", "p", "--secret-file", tmp_path / "s", "--errors", tmp_path / "errors.jsonl"]
    for _ in range(2):
        done = deidentify(tmp_path / "in", out, *args)
        assert (done.returncode, done.stdout.strip()) == (0, "exported 5, skipped 2, failed 0"), done.stderr
        assert len(list(out.rglob("*.dcm"))) == len(paths)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
