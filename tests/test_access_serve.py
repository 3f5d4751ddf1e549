"""`dicomweb serve` on its embedded default is secure by default: an owner token in a 0600 file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from bench.common import free_port, wait_ready


def test_embedded_default_creates_an_owner_token_file(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    cmd = [sys.executable, "-m", "dicomweb.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(f"{base}/health/ready", proc, timeout=120):
            proc.kill()
            raise AssertionError(
                f"serve did not start ({proc.wait()}): {proc.communicate()[0].decode()[-3000:]}"
            )
        token_file = data_dir / "owner-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert httpx.get(f"{base}/v2/studies", timeout=30).status_code == 401
        r = httpx.get(f"{base}/v2/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.decode()
    assert f"owner API token in {token_file.resolve()}" in text
    assert token not in text  # the path is printed, never the token
