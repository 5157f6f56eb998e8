"""The admin API (README.md, "Admin API") on `admin.bind`, served by the supervisor.

Every change goes the same way: edit a copy of the config document (fastgw/config/store.py),
validate it exactly as `fastgw check` would, let every worker prepare it, persist it, switch it on
(ControlPlane.change, fastgw/server/control_plane.py). Anything that fails on the way leaves the
running config as it was.
"""
from __future__ import annotations

import platform
from pathlib import Path

import msgspec
import uvloop

from fastgw import __version__
from fastgw.admin.changelog import describe, entity
from fastgw.admin.http import AdminApp, AdminServer, HTTPError, Response
from fastgw.admin.live import MAX_ANALYTICS_MINUTES, LiveStats, analytics, history, target_health
from fastgw.admin.metrics import render
from fastgw.admin.origin import SameOrigin
from fastgw.config.errors import ConfigError, ConfigWriteError, ConflictError
from fastgw.config.model import parse_duration
from fastgw.config.validate import parse_bind
from fastgw.log import log
from fastgw.server.control_plane import ControlPlane

KINDS = ("services", "routes", "consumers")
# Probes (load balancers, Kubernetes) cannot always send a token: liveness and readiness are open.
PUBLIC = {("GET", "/status"), ("GET", "/status/ready"),
          # the dashboard's files hold no data: the page asks for the token before any API call
          ("GET", "/"), ("GET", "/dashboard.css"), ("GET", "/dashboard.js")}
STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "dashboard.css": "text/css; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8"}


class Admin:
    """The admin API as the supervisor keeps it (fastgw.server.control_plane.AdminHandle)."""

    def __init__(self, supervisor: ControlPlane, server: AdminServer, app: AdminApp, bind_host: str):
        self.supervisor, self.server, self.app, self.bind_host = supervisor, server, app, bind_host

    def configure(self, spec) -> None:
        """A reload may change the token and the allowed hosts; a new bind address needs a restart."""
        self.app.token = spec.token if spec is not None else None
        self.app.guard = SameOrigin(self.bind_host, spec.allowed_hosts if spec is not None else [])

    async def close(self) -> None:
        await self.server.close()


async def start_admin(supervisor: ControlPlane, spec) -> Admin:
    """fastgw.server.control_plane.StartAdmin: listen on `admin.bind`."""
    host, port = parse_bind(spec.bind)
    app = build_app(supervisor, spec.token, SameOrigin(host, spec.allowed_hosts))
    server = AdminServer(app)
    await server.start(host, port)
    return Admin(supervisor, server, app, host)


def _config_error(exc: ConfigError) -> Response:
    problems = [str(p) for p in exc.problems]
    return Response.json({"error": {"status": 400, "code": "invalid_config",
                                    "message": problems[0] if problems else "invalid config",
                                    "problems": problems}}, status=400)


def build_app(sup: ControlPlane, token: str | None, guard: SameOrigin) -> AdminApp:
    app = AdminApp(token=token, public=PUBLIC, guard=guard)
    store = sup.store

    async def change(req, edit, kind: str | None = None, name: str = "") -> Response:
        """Apply an edit of the document (of the object `kind`/`name`, or of the whole config);
        the answer is the new config version. The change log names what changed."""
        seen = {}

        def checked() -> dict:
            # Under the supervisor's change lock: `old` is the document this edit starts from.
            seen["old"], seen["new"] = store.loaded.document, store.check_change(edit())
            return seen["new"]
        try:
            version = await sup.change(checked)
        except ConfigError as exc:
            return _config_error(exc)
        except LookupError as exc:
            raise HTTPError(404, "not_found", _message(exc)) from None
        except ConflictError as exc:
            raise HTTPError(409, "conflict", str(exc)) from None
        except ConfigWriteError as exc:
            raise HTTPError(409 if not store.persistable else 500, "not_persisted", str(exc)) from None
        except ValueError as exc:
            raise HTTPError(400, "bad_request", str(exc)) from None
        if kind is None:
            log(f"admin: {req.method} config: {describe(seen['old'], seen['new'])}")
        else:
            log(f"admin: {req.method} {kind[:-1]} {name}: "
                f"{describe(entity(seen['old'], kind, name), entity(seen['new'], kind, name))}")
        return Response.json({"config_version": version, "persisted": store.persistable})

    live = LiveStats(sup)

    def static(name: str):
        async def serve(req):
            return Response(200, (STATIC / name).read_bytes(), {"cache-control": "no-cache"},
                            STATIC_TYPES[name])
        return serve

    app.route("GET", "/")(static("index.html"))
    app.route("GET", "/dashboard.css")(static("dashboard.css"))
    app.route("GET", "/dashboard.js")(static("dashboard.js"))

    @app.route("GET", "/api")
    async def index(req):
        return {"fastgw": __version__, "endpoints": sorted({f"{m} {p}" for m, p in app.routes()})}

    @app.route("GET", "/events")
    async def events(req):
        return Response.stream(live.events())

    @app.route("GET", "/analytics")
    async def usage(req):
        by = req.query.get("by", "route")
        minutes = _window_minutes(req.query.get("window", "15m"))
        if by not in ("route", "service", "consumer") or not minutes:
            raise HTTPError(400, "bad_request", "by: route | service | consumer; window: 1m to 60m (e.g. 15m)")
        return analytics(sup, by, minutes)

    @app.route("GET", "/history")
    async def traffic_history(req):
        minutes = _window_minutes(req.query.get("window", "5m"))
        if not minutes:
            raise HTTPError(400, "bad_request", "window: 1m to 60m (e.g. 5m)")
        return history(sup, minutes)

    @app.route("GET", "/status")
    async def status(req):
        return sup.status()

    @app.route("GET", "/status/ready")
    async def ready(req):
        body = {"ready": sup.ready(), "config_version": store.version,
                "draining": sup.draining}
        return Response.json(body, status=200 if body["ready"] else 503)

    @app.route("GET", "/metrics")
    async def metrics(req):
        return Response(body=render(sup.segment, metric_labels(sup)),
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.route("POST", "/reload")
    async def reload(req):
        try:
            version = await sup.reload()
        except ConfigError as exc:
            return _config_error(exc)
        return {"config_version": version}

    @app.route("POST", "/cache/purge")
    async def purge_cache(req):
        spec = _object(req)
        by_key = set(spec) == {"key"} and isinstance(spec["key"], str) and spec["key"].count(" ") >= 2
        by_prefix = bool(spec) and set(spec) <= {"host", "path_prefix"} and \
            all(isinstance(v, str) for v in spec.values()) and spec.get("path_prefix", "/").startswith("/")
        if not (by_key or by_prefix):
            raise HTTPError(400, "bad_request", 'give {"key": "GET host /path?query"} or '
                                                '{"host": "...", "path_prefix": "/..."}')
        return {"purged": await sup.purge_cache(spec)}

    # --- the whole config ------------------------------------------------------------------------

    @app.route("GET", "/config")
    async def get_config(req):
        return {"config_version": store.version, "config": store.redacted()}

    @app.route("PUT", "/config")
    async def put_config(req):
        document = _document(req)
        return await change(req, lambda: store.with_document(document))

    @app.route("POST", "/config/validate")
    async def validate_config(req):
        try:
            document = store.with_document(_document(req))
        except ValueError as exc:
            raise HTTPError(400, "bad_request", str(exc)) from None
        answer = {"diff": store.diff(store.document, document)}
        try:
            loaded = store.validate(store.check_change(document))
        except ConfigWriteError as exc:             # a TOML file: valid or not, it is not written
            raise HTTPError(409, "not_persisted", str(exc)) from None
        except ConfigError as exc:
            return {"valid": False, "errors": [str(p) for p in exc.problems
                                               if p.severity == "error"],
                    "warnings": [str(p) for p in exc.problems if p.severity != "error"], **answer}
        return {"valid": True, "errors": [], "warnings": [str(w) for w in loaded.warnings], **answer}

    # --- services, routes, consumers -------------------------------------------------------------

    for kind in KINDS:
        _object_routes(app, store, change, kind)

    # --- targets ---------------------------------------------------------------------------------

    @app.route("POST", "/services/{name}/targets")
    async def add_target(req):
        target = _object(req)
        return await change(req, lambda: store.with_target(req.params["name"], target),
                            "services", req.params["name"])

    @app.route("PATCH", "/services/{name}/targets/{address}")
    async def patch_target(req):
        patch = _object(req)
        return await change(req, lambda: store.with_target_patch(
            req.params["name"], req.params["address"], patch), "services", req.params["name"])

    @app.route("DELETE", "/services/{name}/targets/{address}")
    async def delete_target(req):
        return await change(req, lambda: store.without_target(req.params["name"], req.params["address"]),
                            "services", req.params["name"])

    @app.route("GET", "/services/{name}/health")
    async def health(req):
        name = req.params["name"]
        service = store.loaded.config.services.get(name)
        if service is None:
            raise HTTPError(404, "not_found", f"no service named {name!r}")
        slots = sup.current_slots["targets"]
        return {"service": name, "targets": [       # named targets: one row per resolved address
            target_health(t, sup.segment.target_stats(slots[(name, t.address)])
                          if slots.get((name, t.address), -1) >= 0 else None, sup.dns_state(t))
            for t in sup.running.services.get(name, service).targets]}

    return app


def _object_routes(app: AdminApp, store, change, kind: str) -> None:
    path = f"/{kind}/{{name}}"

    @app.route("GET", f"/{kind}")
    async def listing(req):
        return {"config_version": store.version, kind: store.list_objects(kind)}

    @app.route("GET", path)
    async def get(req):
        try:
            return store.get_object(kind, req.params["name"])
        except LookupError as exc:
            raise HTTPError(404, "not_found", _message(exc)) from None

    @app.route("PUT", path)
    async def put(req):
        obj = _object(req)
        return await change(req, lambda: store.with_object(kind, req.params["name"], obj),
                            kind, req.params["name"])

    @app.route("DELETE", path)
    async def delete(req):
        return await change(req, lambda: store.without_object(kind, req.params["name"]),
                            kind, req.params["name"])


def _window_minutes(window: str) -> int:
    """`15m` -> 15 (whole minutes, rounded up); 0 when it is not a duration of 1 to 60 minutes."""
    try:
        minutes = -(-parse_duration(window) // 60)
    except ValueError:
        return 0
    return int(minutes) if 1 <= minutes <= MAX_ANALYTICS_MINUTES else 0


def _object(req) -> dict:
    value = req.json()
    if not isinstance(value, dict):
        raise HTTPError(400, "bad_request", "the body must be a JSON object")
    return value


def _document(req) -> dict:
    value = _object(req)
    # GET /config answers {"config_version", "config"}: accept that shape back as well.
    if set(value) == {"config_version", "config"} and isinstance(value["config"], dict):
        value = value["config"]
    return value


def _message(exc: LookupError) -> str:
    return exc.args[0] if exc.args else str(exc)


def metric_labels(sup: ControlPlane) -> dict:
    """What the renderer needs to name the shared-memory slots of the current config."""
    config = sup.store.loaded.config
    slots = sup.current_slots
    return {
        "routes": [(0, "", "")] + [(slots["routes"][r.name], r.name, r.service or "")
                                   for r in config.routes if slots["routes"].get(r.name, -1) >= 0],
        "targets": [(slot, svc, addr) for (svc, addr), slot in slots["targets"].items()
                    if slot >= 0 and svc in config.services],
        "listeners": [(slot, name) for name, slot in slots["listeners"].items() if slot >= 0],
        "config_version": sup.store.version,
        "reloads": dict(sup.reloads),
        "workers": sup.workers_running(),
        "build": {"version": __version__, "python": platform.python_version(),
                  "uvloop": uvloop.__version__, "msgspec": msgspec.__version__},
    }
