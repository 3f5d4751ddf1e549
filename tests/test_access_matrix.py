"""Every route family x every role, allowed or denied, against one running archive with authentication on.

The expected table is written out here on its own (not read from access.policy), so a change to the policy
must change this test too. An allowed request may still fail for other reasons (404 for the made-up study,
400 for an empty body): what matters is that it is neither 401 nor 403. A denied one is exactly 403 with
the same body whatever the path addresses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.access_support import bearer, fresh_database, make_token, start_secure

ROLES = ["owner", "writer", "reader", "worklist", "researcher", "reviewer", "auditor"]
ALL = set(ROLES)
STUDY, SERIES, SOP = (
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
)
S = f"/v2/studies/{STUDY}"
SE = f"{S}/series/{SERIES}"
I = f"{SE}/instances/{SOP}"  # noqa: E741

EXPECTED: dict[str, set[str]] = {
    "stow": {"owner", "writer"},
    "qido": {"owner", "reader"},  # researchers: only in a partition they hold a grant for (test_access.py)
    "wado": {"owner", "reader"},
    "delete": {"owner", "writer"},
    "changefeed": {"owner", "reader"},
    "eqt-read": {"owner", "writer", "reader"},
    "eqt-write": {"owner"},
    "operations": {"owner", "writer", "reviewer"},
    "export": {"owner"},
    "update": {"owner", "writer"},
    "workitems": {"owner", "worklist"},
    "audit": {"owner", "auditor"},
    "metrics": {"owner", "auditor"},
    "tokens": {"owner"},
    "reidentify": {"owner"},
    "datarequests-submit": {"researcher"},
    "datarequests-read": {"owner", "researcher", "reviewer", "auditor"},
    # a researcher gets 403 for any request not their own, existing or not (tests/test_access_requests.py)
    "datarequests-read-one": {"owner", "reviewer", "auditor"},
    "datarequests-review": {"owner", "reviewer"},
    # the list itself shows each role only the partitions it may use (tests/test_partitions_list.py)
    "partitions": {"owner", "writer", "reader", "worklist", "researcher"},
    # retention policies and legal holds are owners'; the status is readable, a restore undoes a delete
    "retention": {"owner"},
    "retention-read": {"owner", "writer", "reader"},
    "restore": {"owner", "writer"},
    "health": ALL,
    "page": ALL,
    "unknown": {"owner"},
}

ROUTES: list[tuple[str, str, str]] = [
    ("stow", "POST", "/v2/studies"),
    ("stow", "POST", S),
    ("stow", "POST", "/v1/studies"),
    ("qido", "GET", "/v2/studies"),
    ("qido", "GET", "/v2/series"),
    ("qido", "GET", "/v2/instances"),
    ("qido", "GET", f"{S}/series"),
    ("qido", "GET", f"{S}/instances"),
    ("qido", "GET", f"{SE}/instances"),
    ("qido", "GET", "/v2/partitions/Microsoft.Default/studies"),
    ("wado", "GET", S),
    ("wado", "GET", f"{S}/metadata"),
    ("wado", "GET", SE),
    ("wado", "GET", f"{SE}/metadata"),
    ("wado", "GET", I),
    ("wado", "GET", f"{I}/metadata"),
    ("wado", "GET", f"{I}/frames/1"),
    ("wado", "GET", f"{I}/bulkdata/7FE00010"),
    ("wado", "GET", f"{S}/rendered"),
    ("wado", "GET", f"{SE}/thumbnail"),
    ("wado", "GET", f"{I}/frames/1/rendered"),
    ("delete", "DELETE", S),
    ("delete", "DELETE", SE),
    ("delete", "DELETE", I),
    ("changefeed", "GET", "/v2/changefeed"),
    ("changefeed", "GET", "/v1/changefeed/latest"),
    ("eqt-read", "GET", "/v2/extendedquerytags"),
    ("eqt-read", "GET", "/v2/extendedquerytags/00101002"),
    ("eqt-read", "GET", "/v2/extendedquerytags/00101002/errors"),
    ("eqt-write", "POST", "/v2/extendedquerytags"),
    ("eqt-write", "PATCH", "/v2/extendedquerytags/00101002"),
    ("eqt-write", "DELETE", "/v2/extendedquerytags/00101002"),
    ("operations", "GET", "/v2/operations/00000000000000000000000000000000"),
    ("operations", "GET", "/v2/partitions/Microsoft.Default/operations/00000000000000000000000000000000"),
    ("export", "POST", "/v2/export"),
    ("update", "POST", "/v2/studies/$bulkUpdate"),
    ("workitems", "GET", "/v2/workitems"),
    ("workitems", "POST", "/v2/workitems"),
    ("workitems", "GET", f"/v2/workitems/{STUDY}"),
    ("audit", "GET", "/audit"),
    ("metrics", "GET", "/metrics"),
    ("tokens", "GET", "/tokens"),
    ("tokens", "POST", "/tokens"),
    ("tokens", "DELETE", "/tokens/no-such-token"),
    ("reidentify", "GET", "/reidentify/project-a/patient/PSEUDONYM"),
    ("datarequests-submit", "POST", "/datarequests"),
    ("datarequests-read", "GET", "/datarequests"),
    ("datarequests-read-one", "GET", "/datarequests/00000000-0000-0000-0000-000000000000"),
    ("datarequests-review", "POST", "/datarequests/00000000-0000-0000-0000-000000000000/approve"),
    ("datarequests-review", "POST", "/datarequests/00000000-0000-0000-0000-000000000000/reject"),
    ("datarequests-review", "POST", "/datarequests/00000000-0000-0000-0000-000000000000/revoke"),
    ("partitions", "GET", "/v2/partitions"),
    ("partitions", "GET", "/v1/partitions"),
    ("retention", "GET", "/v2/retention"),
    ("retention", "PUT", "/v2/retention"),  # no body: 415 when allowed, nothing changes
    ("retention", "DELETE", "/v1/partitions/Microsoft.Default/retention"),
    ("retention", "PUT", f"{S}/legalhold"),
    ("retention", "DELETE", f"{S}/legalhold"),
    ("retention-read", "GET", f"{S}/retention"),
    ("restore", "POST", f"{S}/$restore"),
    ("health", "GET", "/health/live"),
    ("health", "GET", "/health/ready"),
    ("health", "GET", "/health/check"),
    ("page", "GET", "/datarequests/page"),
    ("unknown", "GET", "/v2/nothing-here"),
    ("unknown", "PUT", S),
    ("unknown", "GET", "/v3/studies"),
    ("unknown", "POST", "/v2/retention"),
    ("unknown", "GET", f"{S}/legalhold"),
    ("unknown", "PUT", f"{S}/$restore"),
]

DENIED = {"error": {"code": 403, "message": "not permitted"}}


@pytest.fixture(scope="module")
async def matrix(
    postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    async with fresh_database(postgres_server) as database_url:
        archive = start_secure(database_url, Path(tmp_path_factory.mktemp("matrix")))
        try:
            role_tokens = {role: (await make_token(database_url, role))[0] for role in ROLES}
            # one client for all cases: creating one (its TLS context) costs more than a request
            async with httpx.AsyncClient(base_url=archive.running.base, timeout=30) as client:
                yield client, role_tokens
        finally:
            archive.thread.stop()


def test_every_family_is_in_the_matrix() -> None:
    assert {family for family, _, _ in ROUTES} == set(EXPECTED)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("family", "method", "path"), ROUTES)
async def test_route_role_matrix(
    matrix: tuple[httpx.AsyncClient, dict[str, str]], family: str, method: str, path: str, role: str
) -> None:
    client, role_tokens = matrix
    r = await client.request(method, path, headers=bearer(role_tokens[role]))
    if role in EXPECTED[family]:
        assert r.status_code not in (401, 403), (r.status_code, r.text)
    else:
        assert r.status_code == 403, (r.status_code, r.text)
        assert r.json() == DENIED


@pytest.mark.parametrize(("family", "method", "path"), ROUTES)
async def test_no_credentials_get_401_with_a_challenge(
    matrix: tuple[httpx.AsyncClient, dict[str, str]], family: str, method: str, path: str
) -> None:
    client, _ = matrix
    r = await client.request(method, path)
    if family in ("health", "page"):
        assert r.status_code not in (401, 403)
        return
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="dicomweb"'
    assert r.json() == {"error": {"code": 401, "message": "authentication required"}}
