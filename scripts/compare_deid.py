"""Compare this archive's de-identification with dicognito and pydicom's deid on the same canary input.

    python -m venv /tmp/cmp && /tmp/cmp/bin/pip install dicognito deid
    PYTHONPATH=. .venv/bin/python scripts/compare_deid.py --other-python /tmp/cmp/bin/python

Writes a series of canary-laden instances (tests/deid_data.py: canaries in table attributes, in a kept
sequence three deep, in private blocks, descriptions and file meta; each instance references the previous
one), runs each tool twice on it (same seed/secret), and reports per tool: canaries that survive (any
8-character piece, any case, anywhere in the output bytes), original UIDs that survive (SOP Class and
Transfer Syntax UIDs excepted), references that no longer resolve within the output, whether two runs give
the same UIDs, and the PS3.15 markers (PatientIdentityRemoved, De-identification Method Code Sequence).
The other tools run in their own interpreter: pydicom's deid is also a top-level package named `deid`.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tempfile
from pathlib import Path

import pydicom

from deid.engine import Deidentifier
from deid.keys import ProjectKeys
from deid.profile import Options, build_plan
from tests.deid_data import CT, leaked, uids_in
from tests.test_deid_profile import make_series

DEID_SCRIPT = """
import sys, pathlib
from deid.config import DeidRecipe
from deid.dicom import get_identifiers, replace_identifiers
files = sorted(str(p) for p in pathlib.Path(sys.argv[1]).glob('*.dcm'))
recipe = DeidRecipe()  # the package's default recipe (deid.dicom)
ids = get_identifiers(files)
replace_identifiers(files, deid=recipe, ids=ids, save=True, output_folder=sys.argv[2], remove_private=True)
"""


def run_ours(src: Path, out: Path) -> None:
    engine = Deidentifier(build_plan(Options()), ProjectKeys("compare", b"c" * 32))
    for path in sorted(src.glob("*.dcm")):
        result = engine(path.read_bytes())
        (out / f"{result.new.sop}.dcm").write_bytes(result.data)


def run_dicognito(python: str, src: Path, out: Path) -> None:
    subprocess.run([python, "-m", "dicognito", "--quiet", "--seed", "compare", "-o", str(out), str(src)],
                   check=True, capture_output=True)  # fmt: skip


def run_pydicom_deid(python: str, src: Path, out: Path) -> None:
    # run outside this repository: its `deid` package would shadow pydicom's
    subprocess.run([python, "-c", DEID_SCRIPT, str(src), str(out)], check=True, capture_output=True, cwd=out)


def analyse(out: Path, canaries: list[str], originals: set[str]) -> dict[str, object]:
    files = sorted(out.glob("*.dcm"))
    sops, references, leaks, kept_uids, marked, coded = set(), [], set(), set(), 0, 0
    where: set[str] = set()
    uid_places: set[str] = set()
    missing_sop = 0
    for path in files:
        data = path.read_bytes()
        leaks.update(leaked(canaries, data))
        kept_uids |= uids_in(data) & originals
        ds = pydicom.dcmread(io.BytesIO(data))
        found = leaked(canaries, data)
        for elem in ds.iterall():
            text = str(elem.value).lower() if elem.VR != "SQ" else ""
            if any(c[:8] in text for c in found):
                where.add(elem.keyword or ("private" if elem.tag.is_private else str(elem.tag)))
        if any(c[:8].encode() in ds.preamble.lower() for c in found if ds.preamble):
            where.add("preamble")
        sops.add(str(ds.get("SOPInstanceUID", "")))
        missing_sop += "SOPInstanceUID" not in ds
        for elem in [*ds.iterall(), *ds.file_meta]:
            if elem.VR == "UI" and str(elem.value) in kept_uids:
                uid_places.add(elem.keyword or str(elem.tag))
        for name in ("ReferencedImageSequence", "SourceImageSequence"):
            references += [str(i.get("ReferencedSOPInstanceUID", "")) for i in ds.get(name) or []]
        marked += ds.get("PatientIdentityRemoved") == "YES"
        coded += "DeidentificationMethodCodeSequence" in ds
    return {
        "files": len(files),
        "canaries leaked": f"{len(leaks)} of {len(canaries)}",
        "leaked in (sample)": sorted(where)[:12],
        "leaked attributes": len(where),
        "original UIDs kept": len(kept_uids),
        "original UIDs kept in": sorted(uid_places),
        "files without SOPInstanceUID": missing_sop,
        "references not resolving": sum(1 for r in references if r not in sops),
        "PatientIdentityRemoved=YES": f"{marked}/{len(files)}",
        "method code sequence": f"{coded}/{len(files)}",
        "sop uids": sops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--other-python", required=True, help="an interpreter with dicognito and deid installed"
    )
    parser.add_argument("--count", type=int, default=3)
    args = parser.parse_args()
    files, canaries = make_series(20260101, args.count, list(range(0, 600, 7)), implicit=False)
    originals = set().union(*(uids_in(f) for f in files)) - {CT, "1.2.840.10008.1.2.1"}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for n, data in enumerate(files):
            (src / f"{n}.dcm").write_bytes(data)
        tools = {
            "this archive (basic profile)": lambda out: run_ours(src, out),
            "dicognito 0.19 (defaults)": lambda out: run_dicognito(args.other_python, src, out),
            "deid 0.4.13 (default recipe)": lambda out: run_pydicom_deid(args.other_python, src, out),
        }
        for name, run in tools.items():
            runs = []
            for attempt in range(2):
                out = Path(tmp) / f"{name[:8].strip()}-{attempt}"
                out.mkdir()
                try:
                    run(out)
                except subprocess.CalledProcessError as exc:
                    print(f"{name}: failed: {exc.stderr.decode()[-500:]}")
                    break
                runs.append(analyse(out, canaries.made, originals))
            if len(runs) == 2:
                report = {k: v for k, v in runs[0].items() if k != "sop uids"}
                report["same UIDs on a second run"] = runs[0]["sop uids"] == runs[1]["sop uids"]
                print(f"{name}: {report}")


if __name__ == "__main__":
    main()
