"""UPS-RS (PS3.18 chapter 11): work items, their state, cancellation requests, search and subscriptions.

The rules live in worklist/; this module reads requests, maps `worklist.store.UpsError` and dataset errors
to status codes with the Warning texts PS3.18 names, and writes responses.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from dicomcore.uids import is_valid_uid, new_uid
from dicomweb.context import context, partition_key, service_root
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import read_body
from dicomweb.negotiation import Offer, select
from worklist import store, subscriptions
from worklist.requirements import FILTERED_SUBSCRIPTION_UID, WORKLIST_SUBSCRIPTION_UID
from worklist.search import SearchError, parse_filter_list, parse_search, search
from worklist.states import State
from worklist.validate import (
    PROCEDURE_STEP_STATE,
    TRANSACTION_UID,
    DatasetError,
    first,
    parse_dataset,
    prepare_create,
    values,
)

_OFFERS = (Offer("application/dicom+json"), Offer("application/json"))
_BODY_TYPES = ("application/dicom+json", "application/json")


def _warning(text: str) -> dict[str, str]:
    return {"Warning": f'299 dicomweb "{text}"'}


def _problem(exc: store.UpsError) -> HTTPProblem:
    return HTTPProblem(exc.status, exc.message, headers=_warning(exc.warning) if exc.warning else None)


def _accept(request: Request) -> str:
    """The response media type: 400 for a malformed Accept header, 406 when it allows neither JSON type."""
    ranked = select(_OFFERS, request.headers.get("accept"), available="application/dicom+json")
    return ranked[0].offer.media_type


async def _dataset(request: Request, *, optional: bool = False) -> dict:
    body = await read_body(request)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body.strip() and media not in _BODY_TYPES:
        raise HTTPProblem(
            415, f"a work item comes as application/dicom+json, not {media or 'no Content-Type'}"
        )
    try:
        return parse_dataset(body, optional=optional)
    except DatasetError as exc:
        raise HTTPProblem(400, str(exc)) from exc


def _bare_uid(request: Request, names: tuple[str, ...], what: str) -> str | None:
    """A UID given as `?{uid}` (PS3.18's URI templates) or as `?name={uid}`; `what` names it in errors."""
    query = request.url.query
    if not query:
        return None
    pairs = parse_qsl(query, keep_blank_values=True)
    value = None
    for key, val in pairs:
        if key.lower() in names:
            found = val or None  # `?transaction-uid=`: none given
        elif not val and is_valid_uid(key):
            found = key
        else:
            raise HTTPProblem(400, f"unknown query parameter {key!r}")
        if found is not None and value is not None and found != value:
            raise HTTPProblem(400, f"more than one {what}")
        value = found or value
    if value is not None and not is_valid_uid(value):
        raise HTTPProblem(400, f"{value!r} is not a valid UID")
    return value


def _workitem_uid(request: Request) -> str:
    uid = request.path_params["workitem"]
    if not is_valid_uid(uid):
        raise HTTPProblem(400, f"workitem {uid!r} is not a valid UID")
    return uid


def _ae_title(request: Request) -> str:
    ae = request.path_params["aetitle"]
    if not (1 <= len(ae) <= 16) or "\\" in ae or not ae.isprintable() or not ae.strip() or not ae.isascii():
        raise HTTPProblem(400, f"{ae!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return ae


# --- transactions ----------------------------------------------------------------------------------------


async def create(request: Request) -> Response:
    """Create Workitem (11.4): 201 with Location (and Content-Location, as Azure's service sends both);
    409 when the UID exists."""
    uid_param = _bare_uid(request, ("workitem",), "workitem UID")
    ds = await _dataset(request)
    try:
        uid, attrs, modified = prepare_create(ds, uid_param)
    except DatasetError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    if not uid:
        uid = new_uid()
        attrs["00080018"] = {"vr": "UI", "Value": [uid]}
    key = await partition_key(request)
    try:
        await store.create(context(request).pool, key, uid, attrs)
    except store.UpsError as exc:
        raise _problem(exc) from exc
    url = f"{service_root(request)}/workitems/{uid}"
    headers = {"Location": url, "Content-Location": url}
    if modified:
        headers.update(_warning("The Workitem was created with modifications."))
    return Response(status_code=201, headers=headers)


async def retrieve(request: Request) -> Response:
    """Retrieve Workitem (11.5): the item without its Transaction UID (never stored in it)."""
    media = _accept(request)
    uid = _workitem_uid(request)
    body = await store.retrieve(context(request).pool, await partition_key(request), uid)
    if body is None:
        raise HTTPProblem(404, f"workitem {uid} does not exist")
    return Response(b"[" + body + b"]", media_type=media)


async def update(request: Request) -> Response:
    """Update Workitem (11.6): needs the owner's Transaction UID once the item is IN PROGRESS."""
    uid = _workitem_uid(request)
    tuid = _bare_uid(request, ("transaction-uid", "transactionuid", "transaction"), "Transaction UID")
    ds = await _dataset(request)
    try:
        await store.update(context(request).pool, await partition_key(request), uid, tuid, ds)
    except store.UpsError as exc:
        raise _problem(exc) from exc
    return Response(status_code=200)


async def change_state(request: Request) -> Response:
    """Change Workitem State (11.7): claim (IN PROGRESS with a new Transaction UID), complete, cancel."""
    uid = _workitem_uid(request)
    ds = await _dataset(request)
    for key, label in ((PROCEDURE_STEP_STATE, "Procedure Step State"), (TRANSACTION_UID, "Transaction UID")):
        if (count := len(values(ds, key))) > 1:  # VM 1: taking the first would act on half a request
            raise HTTPProblem(400, f"{label} ({key[:4]},{key[4:]}) holds one value, not {count}")
    requested_text = first(ds, PROCEDURE_STEP_STATE)
    requested = State.from_code(requested_text) if isinstance(requested_text, str) else None
    if requested is None:
        raise HTTPProblem(400, f"Procedure Step State (0074,1000) {requested_text!r} is not a UPS state")
    tuid = first(ds, TRANSACTION_UID)
    if not tuid:
        raise HTTPProblem(
            400,
            "Transaction UID (0008,1195) is required",
            headers=_warning("The Transaction UID is missing."),
        )
    if not isinstance(tuid, str) or not is_valid_uid(tuid):
        raise HTTPProblem(400, f"Transaction UID (0008,1195) {tuid!r} is not a valid UID")
    extra = set(ds) - {PROCEDURE_STEP_STATE, TRANSACTION_UID, "00080005"}
    if extra:
        raise HTTPProblem(
            400, f"a state change takes only Procedure Step State and Transaction UID, not {sorted(extra)}"
        )
    try:
        warning = await store.set_state(
            context(request).pool, await partition_key(request), uid, requested, tuid
        )
    except store.UpsError as exc:
        raise _problem(exc) from exc
    return Response(status_code=200, headers=_warning(warning) if warning else None)


async def cancel_request(request: Request) -> Response:
    """Request Cancellation (11.8): 202; a SCHEDULED item is canceled at once, an IN PROGRESS one's owner
    is told (Cancel Requested event)."""
    uid = _workitem_uid(request)
    ds = await _dataset(request, optional=True)
    try:
        warning = await store.cancel(context(request).pool, await partition_key(request), uid, ds)
    except store.UpsError as exc:
        raise _problem(exc) from exc
    return Response(status_code=202, headers=_warning(warning) if warning else None)


async def search_workitems(request: Request) -> Response:
    """Search (11.9): 200, 204 when nothing matches, 206 with a Warning when more pages remain."""
    media = _accept(request)
    settings = context(request).settings
    try:
        query = parse_search(
            request.query_params.multi_items(),
            default_limit=settings.qido_default_limit,
            max_limit=settings.qido_max_limit,
        )
        page = await search(context(request).pool, await partition_key(request), query)
    except SearchError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    if not page.results:
        return Response(status_code=204)
    body = b"[" + b",".join(page.results) + b"]"
    if page.more:
        return Response(
            body, status_code=206, media_type=media,
            headers=_warning("There are additional results that can be requested"),
        )  # fmt: skip
    return Response(body, media_type=media)


# --- subscriptions ------------------------------------------------------------------------------------------


def _deletion_lock(request: Request) -> bool:
    value = request.query_params.get("deletionlock", "false")
    if value not in ("true", "false"):
        raise HTTPProblem(400, f"deletionlock must be true or false, not {value!r}")
    return value == "true"


def websocket_url(request: Request, ae_title: str) -> str:
    """A subscriber's Notification Connection (PS3.18 8.10.4), at the service root it subscribed under."""
    root = service_root(request)
    return "ws" + root.removeprefix("http") + f"/ws/subscribers/{ae_title}"


async def subscribe(request: Request) -> Response:
    """Subscribe (11.10) to a work item, the worklist, or a filtered worklist."""
    uid, ae = _workitem_uid(request), _ae_title(request)
    lock = _deletion_lock(request)
    unknown = set(request.query_params) - {"deletionlock", "filter"}
    if unknown:
        raise HTTPProblem(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    key = await partition_key(request)
    pool = context(request).pool
    filter_text = request.query_params.get("filter")
    try:
        if uid == FILTERED_SUBSCRIPTION_UID:
            if not filter_text:
                raise HTTPProblem(400, "a Filtered Worklist Subscription needs the filter parameter")
            filters = parse_filter_list(filter_text)
            await subscriptions.subscribe_worklist(pool, key, ae, filters, filter_text, lock)
        elif filter_text is not None:
            raise HTTPProblem(400, f"filter applies to {FILTERED_SUBSCRIPTION_UID} subscriptions only")
        elif uid == WORKLIST_SUBSCRIPTION_UID:
            await subscriptions.subscribe_worklist(pool, key, ae, None, None, lock)
        else:
            await subscriptions.subscribe_workitem(pool, key, ae, uid, lock)
    except SearchError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    except store.UpsError as exc:
        raise _problem(exc) from exc
    return Response(status_code=201, headers={"Content-Location": websocket_url(request, ae)})


async def unsubscribe(request: Request) -> Response:
    """Unsubscribe (11.11)."""
    uid, ae = _workitem_uid(request), _ae_title(request)
    key = await partition_key(request)
    pool = context(request).pool
    try:
        if uid in (WORKLIST_SUBSCRIPTION_UID, FILTERED_SUBSCRIPTION_UID):
            await subscriptions.unsubscribe_worklist(pool, key, ae, uid == FILTERED_SUBSCRIPTION_UID)
        else:
            await subscriptions.unsubscribe_workitem(pool, key, ae, uid)
    except store.UpsError as exc:
        raise _problem(exc) from exc
    return Response(status_code=200)


async def suspend(request: Request) -> Response:
    """Suspend Global Subscription (11.12)."""
    uid, ae = _workitem_uid(request), _ae_title(request)
    if uid not in (WORKLIST_SUBSCRIPTION_UID, FILTERED_SUBSCRIPTION_UID):
        raise HTTPProblem(
            400, f"only worklist subscriptions ({WORKLIST_SUBSCRIPTION_UID}[.1]) can be suspended"
        )
    try:
        await subscriptions.suspend_worklist(
            context(request).pool, await partition_key(request), ae, uid == FILTERED_SUBSCRIPTION_UID
        )
    except store.UpsError as exc:
        raise _problem(exc) from exc
    return Response(status_code=200)
