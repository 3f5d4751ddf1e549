"""deploy/: the manifests name settings, commands and probes that exist, and `dicomweb migrate` prepares a
fresh deployment (schema and bucket) the way the compose file and the Kubernetes Job run it."""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from dicomweb.config import Settings
from tests.fixtures.s3 import S3Server, make_s3_store

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SETTING_VARS = {f"DICOMWEB_{f.name.upper()}" for f in dataclasses.fields(Settings)}
AWS_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
COMMANDS = {"serve", "migrate"}
PROBES = {"/health/live", "/health/ready", "/metrics"}


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def check_env_names(names: set[str]) -> None:
    unknown = {n for n in names if n.startswith("DICOMWEB_")} - SETTING_VARS
    assert not unknown, f"not settings of dicomweb.config.Settings: {unknown}"
    assert names <= SETTING_VARS | AWS_VARS, names - SETTING_VARS - AWS_VARS


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "s3", "migrate", "archive"} <= set(services)
    for name in ("migrate", "archive"):
        service = services[name]
        check_env_names(set(service["environment"]))
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY.parent / service["build"]["dockerfile"]).is_file()
    assert services["migrate"]["command"][:2] == ["dicomweb", "migrate"]
    assert services["archive"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # the S3 credentials the archive uses are the ones the S3 server is configured with
    s3_config = (DEPLOY / "seaweedfs-s3.json").read_text()
    env = services["archive"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] in s3_config and env["AWS_SECRET_ACCESS_KEY"] in s3_config
    assert env["DICOMWEB_S3_ENDPOINT_URL"].endswith(":8333")
    assert all(port.startswith("127.0.0.1:") for port in services["archive"]["ports"])


def test_kubernetes_manifests() -> None:
    docs = k8s_documents()
    by_kind = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "Secret", "Job", "Deployment", "Service"} <= set(by_kind)
    names = set(by_kind["ConfigMap"]["data"]) | set(by_kind["Secret"]["stringData"])
    check_env_names(names)
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    for kind in ("Job", "Deployment"):
        (container,) = by_kind[kind]["spec"]["template"]["spec"]["containers"]
        assert container["command"][0] == "dicomweb" and container["command"][1] in COMMANDS
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {by_kind["ConfigMap"]["metadata"]["name"], by_kind["Secret"]["metadata"]["name"]}
        check_env_names({e["name"] for e in container.get("env", [])})
    (container,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {
        container["readinessProbe"]["httpGet"]["path"],
        container["livenessProbe"]["httpGet"]["path"],
    } <= (PROBES)
    selector = by_kind["Deployment"]["spec"]["selector"]["matchLabels"]
    assert by_kind["Service"]["spec"]["selector"] == selector
    assert by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"] == selector


def test_systemd_unit_and_env_file() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "dicomweb.service")
    exec_start = unit["Service"]["ExecStart"].split()
    assert exec_start[0].endswith("/dicomweb") and exec_start[1] in COMMANDS
    names = set()
    for line in (DEPLOY / "systemd" / "dicomweb.env").read_text().splitlines():
        line = line.lstrip("#").strip()
        if "=" in line and line.split("=", 1)[0].isupper():
            names.add(line.split("=", 1)[0])
    check_env_names(names)


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


async def test_migrate_prepares_database_and_bucket(database_url: str, s3_server: S3Server) -> None:
    bucket = f"deploy-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "DICOMWEB_DATABASE_URL": database_url,
        "DICOMWEB_STORAGE_URL": f"s3://{bucket}/objects",
        "DICOMWEB_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "DICOMWEB_S3_REGION": s3_server.region,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    command = [sys.executable, "-m", "dicomweb.cli", "migrate"]
    first = await asyncio.to_thread(run, command, env)
    assert first.returncode == 0, first.stderr
    assert "applied: 0001_core" in first.stdout and f"bucket ready: s3://{bucket}/objects" in first.stdout
    again = await asyncio.to_thread(run, command, env)
    assert again.returncode == 0, again.stderr
    assert "applied: nothing (up to date)" in again.stdout
    store = make_s3_store(s3_server, bucket, "objects")
    try:
        await store.put("probe", b"x")  # the bucket exists and the credentials can write to it
        assert await store.read("probe") == b"x"
    finally:
        await store.close()
