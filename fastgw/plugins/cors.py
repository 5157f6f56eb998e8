"""cors: answers preflights itself and labels actual responses (Fetch standard, "CORS protocol").

An origin is allowed when it is in `origins` exactly, matches a `~regex` entry, or `origins` is
`["*"]`. With `credentials: true` the allowed origin is echoed (never `*`), and `*` in `origins` is
refused at config load, so a credentialed request from an arbitrary site is never allowed.
"""
from __future__ import annotations

import re

import msgspec

from fastgw.config.model import Duration
from fastgw.api import Plugin, Response


class Cors(Plugin):
    name = "cors"
    phase = "access"
    priority = 2000                                # before authentication: preflights carry no credentials

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
        methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"])
        headers: list[str] = []                    # allowed request headers; empty: echo what is asked
        expose_headers: list[str] = []
        credentials: bool = False
        max_age: Duration | None = None

        def __post_init__(self):
            if self.credentials and "*" in self.origins:
                raise ValueError("credentials: true cannot be combined with origins [\"*\"]: "
                                 "list the origins that may send credentials")
            for origin in self.origins:
                if origin.startswith("~"):
                    try:
                        re.compile(origin[1:])
                    except re.error as exc:
                        raise ValueError(f"invalid origin regex {origin!r}: {exc}") from None

    def __init__(self, config):
        super().__init__(config)
        self.any_origin = "*" in config.origins
        self.exact = {o for o in config.origins if not o.startswith("~")}
        self.patterns = [re.compile(o[1:]) for o in config.origins if o.startswith("~")]
        self.methods = ", ".join(m.upper() for m in config.methods)
        self.allowed_headers = ", ".join(config.headers)
        self.expose = ", ".join(config.expose_headers)

    def _allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.exact or any(p.fullmatch(origin) for p in self.patterns)

    def _label(self, headers, origin: str) -> None:
        headers.set("access-control-allow-origin",
                    "*" if self.any_origin and not self.config.credentials else origin)
        if self.config.credentials:
            headers.set("access-control-allow-credentials", "true")
        if not self.any_origin:
            headers.add("vary", "Origin")

    def on_request(self, req):
        origin = req.headers.get("origin")
        if origin is None:
            return None
        preflight = req.method == "OPTIONS" and "access-control-request-method" in req.headers
        if not self._allowed(origin):
            if preflight:
                return Response.error(403, "cors_rejected", f"origin {origin} is not allowed")
            return None                            # no CORS headers: the browser blocks the read
        req.ctx["cors_origin"] = origin
        if not preflight:
            return None
        resp = Response(204)
        self._label(resp.headers, origin)
        resp.headers.set("access-control-allow-methods", self.methods)
        asked = req.headers.get("access-control-request-headers")
        allowed = self.allowed_headers or asked
        if allowed:
            resp.headers.set("access-control-allow-headers", allowed)
        if self.config.max_age is not None:
            resp.headers.set("access-control-max-age", str(int(self.config.max_age)))
        req.ctx["cors_preflight"] = True
        return resp

    def on_response(self, req, resp):
        origin = req.ctx.get("cors_origin")
        if origin is None or req.ctx.get("cors_preflight"):
            return
        self._label(resp.headers, origin)
        if self.expose:
            resp.headers.set("access-control-expose-headers", self.expose)
