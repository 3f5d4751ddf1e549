"""The route classifier and the policy, without a server: partition scopes hold for any path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from access.authn import parse_roles
from access.policy import Family, Grant, Role, allows, classify
from dicomweb.auth import jwt_config
from dicomweb.config import Settings

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SEGMENTS = st.sampled_from(
    ["v1", "v2", "v3", "partitions", "alpha", "beta", "ALPHA", "alpha.", "research-1", "..", ".", "",
     "studies", "series", "instances", "1.2.3", "metadata", "frames", "1", "bulkdata", "changefeed", "audit",
     "workitems", "extendedquerytags", "operations", "export", "datarequests", "page", "health", "live",
     "metrics", "%2F", "alpha/../beta", "ws", "subscribers", "retention", "legalhold", "$restore"]
)  # fmt: skip
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


@given(METHODS, st.lists(SEGMENTS, min_size=0, max_size=9))
def test_a_partition_scoped_grant_reaches_only_its_partition(method: str, segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    target = classify(method, path)
    grants = [Grant(role, "alpha") for role in Role]
    if allows(grants, target, NOW) and target.family not in (Family.HEALTH, Family.PAGE):
        assert target.partition == "alpha"
        assert path.startswith(("/v1/partitions/alpha/", "/v2/partitions/alpha/")), path


@given(METHODS, st.lists(SEGMENTS, min_size=0, max_size=9))
def test_research_partitions_need_the_researchers_own_grant(method: str, segments: list[str]) -> None:
    target = classify(method, "/" + "/".join(segments))
    others = [Grant(role) for role in Role if role is not Role.OWNER]
    if target.partition is not None and target.partition.startswith("research-"):
        assert not allows(others, target, NOW)


def test_examples() -> None:
    t = classify("GET", "/v2/partitions/p1/studies/1.2/series/1.3/instances/1.4/frames/1,2")
    assert (t.family, t.partition, t.study, t.series, t.instance) == (Family.WADO, "p1", "1.2", "1.3", "1.4")
    assert classify("DELETE", "/v1/studies/1.2/series/1.3").family is Family.DELETE
    assert classify("DELETE", "/v1/studies/1.2/metadata").family is Family.UNKNOWN
    assert classify("POST", "/v2/studies/1.2/series/1.3").family is Family.UNKNOWN
    assert classify("GET", "/v2/studies/1.2/series/1.3/series").family is Family.UNKNOWN
    assert classify("HEAD", "/v2/studies").family is Family.QIDO
    assert classify("GET", "/v2/ws/subscribers/AE1").family is Family.WORKITEMS
    expiring = [Grant(Role.RESEARCHER, "research-1", NOW + timedelta(seconds=1))]
    read = classify("GET", "/v2/partitions/research-1/studies")
    assert allows(expiring, read, NOW) and not allows(expiring, read, NOW + timedelta(seconds=1))
    assert not allows([Grant(Role.RESEARCHER)], classify("GET", "/v2/studies"), NOW)


@given(
    METHODS,
    st.sampled_from(["", "/v1/partitions/alpha", "/v2/partitions/research-1"]),
    st.from_regex(r"[0-9]{1,8}(\.[0-9]{1,8}){0,6}", fullmatch=True),
    st.sampled_from(["legalhold", "retention", "$restore"]),
)
def test_retention_routes_of_a_study(method: str, root: str, study: str, what: str) -> None:
    """Each of a study's retention resources answers its own methods, in its family; others are UNKNOWN."""
    target = classify(method, f"{root or '/v2'}/studies/{study}/{what}")
    allowed = {"legalhold": {"PUT", "DELETE"}, "retention": {"GET", "HEAD"}, "$restore": {"POST"}}[what]
    family = {"legalhold": Family.RETENTION, "retention": Family.RETENTION_READ, "$restore": Family.RESTORE}[
        what
    ]
    if method in allowed:
        assert (target.family, target.study) == (family, study)
        assert target.partition == (root.rsplit("/", 1)[1] if root else "Microsoft.Default")
    else:
        assert target.family is Family.UNKNOWN


def test_retention_examples() -> None:
    assert classify("PUT", "/v2/retention").family is Family.RETENTION
    assert classify("GET", "/v1/partitions/p1/retention").partition == "p1"
    assert classify("POST", "/v2/retention").family is Family.UNKNOWN
    assert classify("PUT", "/v2/retention/x").family is Family.UNKNOWN
    assert classify("PUT", "/v2/studies/1.2/series/1.3/legalhold").family is Family.UNKNOWN
    assert classify("PUT", "/v2/studies/1.2/legalhold").action_code == "U"
    assert classify("DELETE", "/v2/studies/1.2/legalhold").action_code == "D"
    assert classify("POST", "/v2/studies/1.2/$restore").action_code == "C"


def test_roles_claim() -> None:
    assert parse_roles(["reader", "writer:alpha", "admin", "reader:../x", 7]) == (
        Grant(Role.READER), Grant(Role.WRITER, "alpha"),
    )  # fmt: skip
    assert parse_roles("owner auditor") == (Grant(Role.OWNER), Grant(Role.AUDITOR))
    assert parse_roles(None) == () and parse_roles({"reader": True}) == ()


def test_a_role_with_an_empty_partition_grants_nothing() -> None:
    """`owner:` (an identity provider's `role:${partition}` template with an empty partition) was read as
    `owner` of every partition: a malformed entry widened the grant to the whole archive. It is ignored
    now, as every other malformed entry is."""
    assert parse_roles(["owner:", "reader:alpha", "writer: ", "auditor:*"]) == (Grant(Role.READER, "alpha"),)
    assert parse_roles("owner: reader") == (Grant(Role.READER),)


def test_jwts_need_issuer_and_audience() -> None:
    assert jwt_config(Settings()) is None
    with pytest.raises(RuntimeError, match="DICOMWEB_JWT_ISSUER and DICOMWEB_JWT_AUDIENCE"):
        jwt_config(Settings(jwt_secret="s", jwt_issuer="https://idp"))
    config = jwt_config(Settings(jwt_jwks_url="https://idp/jwks", jwt_issuer="https://idp", jwt_audience="a"))
    assert config is not None and (config.jwks_url, config.secret, config.roles_claim) == (
        "https://idp/jwks",
        None,
        "roles",
    )
    env = {"DICOMWEB_INSECURE_OPEN": "true", "DICOMWEB_TRUSTED_PROXIES": "10.0.0.0/8"}
    assert Settings.from_env(env).insecure_open and not Settings.from_env({}).insecure_open
    assert Settings.from_env(Settings(insecure_open=True).to_env()).insecure_open
