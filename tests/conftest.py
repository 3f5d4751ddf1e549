"""Shared fixtures: real PostgreSQL and a real S3 server, started once per test session on loopback."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.server",
    "tests.fixtures.fhir",
]
