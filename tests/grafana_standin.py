"""A local stand-in for the parts of Grafana's HTTP API that ``repwatch grafana push`` uses.

No Grafana server can run here, so the push is tested against this: a FastAPI app served by
uvicorn on 127.0.0.1 (free port, in a thread) that implements only these routes, checks each
request against Grafana's documented API and rejects anything else with a 4xx, and keeps state
(folders, dashboards with versions, alert rules with provenance) so that idempotency and updates
can be checked.

Routes and what is checked (from the documentation pages cited):

* every request: ``Authorization: Bearer <token>`` with a known token, else 401; a token of the
  Viewer role gets 403 on writes; POST/PUT need ``Content-Type: application/json``, else 415.
  Unknown routes 404, wrong methods 405 (FastAPI's own).
* Folder API (https://grafana.com/docs/grafana/v11.0/developers/http_api/folder/):
  ``GET /api/folders/:uid`` (404 when missing); ``POST /api/folders`` with ``title`` (required
  string) and optional ``uid`` (at most 40 characters of ``[a-zA-Z0-9_-]``) and ``parentUid``;
  409 when the uid or the title is taken.
* Dashboard API (https://grafana.com/docs/grafana/v11.0/developers/http_api/dashboard/):
  ``POST /api/dashboards/db`` with ``dashboard`` (object; ``title`` required; ``id`` null to
  create; ``uid`` optional, at most 40 characters), ``folderUid``, ``overwrite`` (bool),
  ``message``. The version starts at 1 and is bumped on each save; without ``overwrite`` a
  stale ``version`` gives 412 ``version-mismatch`` and a new dashboard whose title is taken in
  the folder 412 ``name-exists``; an unknown ``folderUid`` 400. Response: id, uid, url, status,
  version, slug.
* Alerting provisioning API
  (https://grafana.com/docs/grafana/v11.0/developers/http_api/alerting_provisioning/,
  ProvisionedAlertRule; required: title, ruleGroup, folderUID, orgID, condition, data,
  noDataState, execErrState, for): ``GET/PUT /api/v1/provisioning/alert-rules/:uid``,
  ``POST /api/v1/provisioning/alert-rules`` (201). Unknown fields are rejected (Grafana would
  ignore a misspelt one silently, which is the mistake to catch), ``condition`` must name a
  ``refId`` of ``data``, a query's ``datasourceUid`` must be a known data source or ``__expr__``
  (then ``model.type`` is math/threshold/reduce/resample/classic_conditions and what it refers
  to exists), the folder must exist; POST with a taken uid or title-in-folder 409, PUT of a
  missing uid 404. ``X-Disable-Provenance`` (any value) stores provenance "" (editable in the
  UI) instead of "api", as documented in "Provision Alerting resources"
  (https://grafana.com/docs/grafana/v9.3/alerting/set-up/provision-alerting-resources/); a
  rule with provenance "api" cannot be changed to "" (400).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

UID = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-zA-Z0-9_-]+$")]
DURATION = Annotated[str, Field(pattern=r"^(0|(\d+(ms|s|m|h|d|w|y))+)$")]
EXPR_UID = "__expr__"
EXPR_TYPES = ("math", "threshold", "reduce", "resample", "classic_conditions")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FolderCreate(_Strict):
    """POST /api/folders body."""

    title: Annotated[StrictStr, Field(min_length=1)]
    uid: UID | None = None
    parentUid: StrictStr | None = None
    description: StrictStr | None = None


class DashboardModel(BaseModel):
    """The dashboard JSON: only what the API itself reads is checked; the rest is kept."""

    model_config = ConfigDict(extra="allow", strict=True)
    title: Annotated[StrictStr, Field(min_length=1)]
    id: StrictInt | None = None
    uid: UID | None = None
    version: StrictInt | None = None
    schemaVersion: StrictInt | None = None
    panels: list[dict[str, Any]] | None = None


class DashboardSave(_Strict):
    """POST /api/dashboards/db body."""

    dashboard: DashboardModel
    folderUid: StrictStr | None = None
    folderId: StrictInt | None = None
    overwrite: StrictBool = False
    message: StrictStr | None = None


class RelativeTimeRange(_Strict):
    from_: StrictInt = Field(alias="from", ge=0)
    to: StrictInt = Field(ge=0)


class AlertQuery(_Strict):
    refId: Annotated[StrictStr, Field(min_length=1)]
    datasourceUid: Annotated[StrictStr, Field(min_length=1)]
    model: dict[str, Any]
    queryType: StrictStr = ""
    relativeTimeRange: RelativeTimeRange | None = None


class AlertRule(_Strict):
    """ProvisionedAlertRule (POST/PUT /api/v1/provisioning/alert-rules)."""

    title: Annotated[StrictStr, Field(min_length=1, max_length=190)]
    ruleGroup: Annotated[StrictStr, Field(min_length=1, max_length=190)]
    folderUID: Annotated[StrictStr, Field(min_length=1)]
    orgID: StrictInt
    condition: Annotated[StrictStr, Field(min_length=1)]
    data: Annotated[list[AlertQuery], Field(min_length=1)]
    noDataState: Literal["Alerting", "NoData", "OK", "KeepLast"]
    execErrState: Literal["Alerting", "Error", "OK", "KeepLast"]
    for_: DURATION = Field(alias="for")
    uid: UID | None = None
    id: StrictInt | None = None
    labels: dict[str, StrictStr] | None = None
    annotations: dict[str, StrictStr] | None = None
    isPaused: StrictBool = False
    updated: StrictStr | None = None
    provenance: StrictStr | None = None
    notification_settings: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    keep_firing_for: DURATION | None = None
    missing_series_evals_to_resolve: StrictInt | None = None


@dataclass
class State:
    """What the stand-in holds; tests read it directly."""

    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    faults: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """(method, path) -> (status, JSON body) answered instead, after the checks above pass:
    to test how the client reports errors that the stand-in never produces by itself."""
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


class _Reject(Exception):
    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.body = code, {"message": message, **extra}


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def create_app(tokens: dict[str, str], datasources: dict[str, str], state: State) -> FastAPI:
    """The app: ``tokens`` maps a token to its role (Admin, Editor, Viewer); ``datasources``
    maps a data-source uid to its type."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    lock = threading.Lock()

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        role = tokens.get(token) if scheme == "Bearer" else None
        if role is None:
            resp: Any = JSONResponse({"message": "invalid API key"}, status_code=401)
        elif request.method in ("POST", "PUT", "DELETE") and role == "Viewer":
            resp = JSONResponse({"message": "You'll need additional permissions to perform "
                                            "this action."}, status_code=403)
        elif request.method in ("POST", "PUT") and not request.headers.get(
                "content-type", "").startswith("application/json"):
            resp = JSONResponse({"message": "Content-Type must be application/json"},
                                status_code=415)
        elif (request.method, request.url.path) in state.faults:
            status, body = state.faults[(request.method, request.url.path)]
            resp = JSONResponse(body, status_code=status)
        else:
            resp = await call_next(request)
        state.requests.append((request.method, request.url.path, resp.status_code))
        return resp

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                         for e in exc.errors())
        return JSONResponse({"message": f"bad request data: {errs}"}, status_code=400)

    @app.exception_handler(_Reject)
    async def rejected(_: Request, exc: _Reject) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    # -------------------------------------------------------------------- folders
    @app.get("/api/folders/{uid}")
    def get_folder(uid: str) -> dict[str, Any]:
        with lock:
            if uid not in state.folders:
                raise _Reject(404, "folder not found")
            return state.folders[uid]

    @app.post("/api/folders")
    def create_folder(body: FolderCreate) -> dict[str, Any]:
        with lock:
            uid = body.uid or f"f{state.next_id:08d}"
            if uid in state.folders:
                raise _Reject(409, "a folder with the same uid already exists")
            if any(f["title"] == body.title and f.get("parentUid") == body.parentUid
                   for f in state.folders.values()):
                raise _Reject(409, "a folder with the same name already exists")
            folder = {"id": state.new_id(), "uid": uid, "title": body.title,
                      "url": f"/dashboards/f/{uid}/{_slug(body.title)}", "version": 1,
                      "parentUid": body.parentUid}
            state.folders[uid] = folder
            return folder

    # -------------------------------------------------------------------- dashboards
    @app.post("/api/dashboards/db")
    def save_dashboard(body: DashboardSave) -> dict[str, Any]:
        dash = body.dashboard.model_dump()
        with lock:
            folder = body.folderUid or ""
            if folder and folder not in state.folders:
                raise _Reject(400, "folder not found")
            uid = dash.get("uid") or f"d{state.next_id:08d}"
            old = state.dashboards.get(uid)
            if old is None:
                if dash.get("id") is not None:
                    raise _Reject(404, "Dashboard not found")
                if not body.overwrite and any(
                        d["dashboard"]["title"] == dash["title"] and d["folderUid"] == folder
                        for d in state.dashboards.values()):
                    raise _Reject(412, "A dashboard with the same name in the folder already "
                                       "exists", status="name-exists")
                did, version = state.new_id(), 1
            else:
                if not body.overwrite and dash.get("version") != old["dashboard"]["version"]:
                    raise _Reject(412, "The dashboard has been changed by someone else",
                                  status="version-mismatch")
                if dash.get("id") not in (None, old["dashboard"]["id"]):
                    raise _Reject(400, "dashboard id does not match its uid")
                did, version = old["dashboard"]["id"], old["dashboard"]["version"] + 1
            dash.update(id=did, uid=uid, version=version)
            state.dashboards[uid] = {"dashboard": dash, "folderUid": folder,
                                     "message": body.message or ""}
            slug = _slug(dash["title"])
            return {"id": did, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success",
                    "version": version, "slug": slug, "folderUid": folder}

    # -------------------------------------------------------------------- alert rules
    def check_rule(rule: AlertRule) -> None:
        refs = [q.refId for q in rule.data]
        if len(set(refs)) != len(refs):
            raise _Reject(400, f"duplicate refId in data: {refs}")
        if rule.condition not in refs:
            raise _Reject(400, f"condition {rule.condition!r} is not a refId of data {refs}")
        if rule.folderUID not in state.folders:
            raise _Reject(400, f"folder {rule.folderUID!r} does not exist")
        for q in rule.data:
            if q.model.get("refId", q.refId) != q.refId:
                raise _Reject(400, f"query {q.refId}: model.refId differs")
            if q.datasourceUid == EXPR_UID:
                kind = q.model.get("type")
                if kind not in EXPR_TYPES:
                    raise _Reject(400, f"expression {q.refId}: type must be one of {EXPR_TYPES}")
                expr = q.model.get("expression")
                if not isinstance(expr, str) or not expr:
                    raise _Reject(400, f"expression {q.refId}: expression missing")
                used = re.findall(r"\$\{?(\w+)", expr) if kind == "math" else [expr]
                if any(u not in refs or u == q.refId for u in used):
                    raise _Reject(400, f"expression {q.refId} refers to {used}, not in {refs}")
                if kind == "threshold":
                    conds = q.model.get("conditions")
                    if not (isinstance(conds, list) and conds and all(
                            isinstance(c.get("evaluator", {}).get("type"), str)
                            and isinstance(c["evaluator"].get("params"), list)
                            for c in conds)):
                        raise _Reject(400, f"threshold {q.refId}: conditions need evaluators")
            else:
                ds_type = datasources.get(q.datasourceUid)
                if ds_type is None:
                    raise _Reject(400, f"data source {q.datasourceUid!r} not found")
                if q.relativeTimeRange is None:
                    raise _Reject(400, f"query {q.refId}: relativeTimeRange required")
                if ds_type == "prometheus" and not isinstance(q.model.get("expr"), str):
                    raise _Reject(400, f"query {q.refId}: model.expr (PromQL) missing")

    def store(rule: AlertRule, uid: str, request: Request) -> dict[str, Any]:
        data = rule.model_dump(by_alias=True, exclude_none=True)
        data.update(uid=uid, provenance="" if "x-disable-provenance" in request.headers
                    else "api", updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if any(r["title"] == data["title"] and r["folderUID"] == data["folderUID"]
               and r["uid"] != uid for r in state.rules.values()):
            raise _Reject(409, "a rule with the same title already exists in the folder")
        old = state.rules.get(uid)
        if old is not None and old["provenance"] == "api" and data["provenance"] == "":
            raise _Reject(400, "cannot change provenance from 'api' to ''")
        data["id"] = old["id"] if old else state.new_id()
        state.rules[uid] = data
        return data

    @app.get("/api/v1/provisioning/alert-rules/{uid}")
    def get_rule(uid: str) -> dict[str, Any]:
        with lock:
            if uid not in state.rules:
                raise _Reject(404, "alert rule not found")
            return state.rules[uid]

    @app.post("/api/v1/provisioning/alert-rules", status_code=201)
    def create_rule(rule: AlertRule, request: Request) -> dict[str, Any]:
        with lock:
            check_rule(rule)
            uid = rule.uid or f"r{state.next_id:08d}"
            if uid in state.rules:
                raise _Reject(409, f"alert rule {uid} already exists")
            return store(rule, uid, request)

    @app.put("/api/v1/provisioning/alert-rules/{uid}")
    def update_rule(uid: str, rule: AlertRule, request: Request) -> dict[str, Any]:
        with lock:
            if uid not in state.rules:
                raise _Reject(404, "alert rule not found")
            if rule.uid not in (None, uid):
                raise _Reject(400, "uid in the body differs from the path")
            check_rule(rule)
            return store(rule, uid, request)

    return app


@dataclass
class StandIn:
    """A running stand-in: its URL, state and tokens."""

    url: str
    state: State
    admin_token: str
    viewer_token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def grafana_standin(admin_token: str = "glsa_admin_test_token",
                    viewer_token: str = "glsa_viewer_test_token",
                    datasources: dict[str, str] | None = None) -> Iterator[StandIn]:
    """Serve the stand-in on 127.0.0.1 (free port) in a thread; stopped on exit."""
    state = State()
    app = create_app({admin_token: "Admin", viewer_token: "Viewer"},
                     datasources if datasources is not None
                     else {"repwatch-prometheus": "prometheus"}, state)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="grafana-standin", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):                            # up to ~10 s
            if server.started:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the Grafana stand-in did not start")
        assert httpx.get(f"{url}/api/folders/x", timeout=5).status_code == 401
        yield StandIn(url, state, admin_token, viewer_token)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
