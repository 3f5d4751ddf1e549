"""The installed archive imports outside the source tree: `dicomweb serve` started from anywhere (or its
worker processes) must find every package, not only the test run, whose working directory is the repo."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {"bench", "tests"}  # benchmarks and tests run from a checkout


def test_every_top_level_package_is_in_the_distribution() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in NOT_SHIPPED)
    assert "dicomweb" in packages and "retention" in packages
    missing = [p for p in packages if not any(fnmatch.fnmatch(p, pattern) for pattern in include)]
    assert missing == [], f"add {missing} to [tool.setuptools.packages.find] include in pyproject.toml"


def test_the_application_imports_from_another_directory(tmp_path: Path) -> None:
    """What uvicorn's worker processes do: import the app with the installed packages only."""
    proc = subprocess.run(
        [sys.executable, "-c", "import dicomweb.app, dicomweb.cli; print('ok')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
