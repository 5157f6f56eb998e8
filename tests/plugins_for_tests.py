"""User plugins the plugin tests load into the gateway (through `python: {module: ...}` and an entry
point); the gateway process finds this module on its PYTHONPATH."""
from __future__ import annotations

import asyncio
import json

import msgspec

from fastgw import Plugin, Response


class Mark(Plugin):
    """Appends `label` to the x-trail request header, so the upstream shows the run order."""
    name = "mark"
    phase = "access"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        label: str
        priority: int = 0
        phase: str = "access"

    def __init__(self, config):
        super().__init__(config)
        self.priority = config.priority               # per instance, for the ordering test
        self.phase = config.phase

    def on_request(self, req):
        trail = req.headers.get("x-trail")
        req.headers.set("x-trail", f"{trail},{self.config.label}" if trail else self.config.label)


class TenantGuard(Plugin):
    """The SPEC's example: a request without the tenant header is answered 403 here."""
    name = "tenant_guard"
    phase = "access"
    priority = 900

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        header: str = "x-tenant"

    def on_request(self, req):
        if not req.headers.get(self.config.header):
            return Response(403, {"x-guard": "tenant"}, json={"missing": self.config.header})
        return None


class SlowLookup(Plugin):
    """Async: waits `delay` seconds (a remote lookup), then lets the request through with a header."""
    name = "slow_lookup"
    phase = "access"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        delay: float = 0.3

    async def on_request(self, req):
        await asyncio.sleep(self.config.delay)
        req.headers.set("x-looked-up", "yes")
        req.query = "?rewritten=1"
        return None


class Stamp(Plugin):
    """Response phase: adds a header to every answer, and a log-phase line to a file."""
    name = "stamp"
    phase = "response"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        log_path: str | None = None

    def on_response(self, req, resp):
        resp.headers.set("x-stamp", f"{req.route}:{resp.status}")
        resp.headers.remove("server")

    def on_log(self, req, resp):
        if self.config.log_path:
            with open(self.config.log_path, "a") as f:
                f.write(json.dumps({"route": req.route, "status": resp.status, "path": req.path}) + "\n")


class Broken(Plugin):
    name = "broken"
    phase = "access"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        how: str = "raise"

    def on_request(self, req):
        if self.config.how == "raise":
            raise RuntimeError("boom")
        if self.config.how == "header":
            req.headers.set("x-evil", "a\r\nx-injected: 1")
        if self.config.how == "type":
            return 42
        return None


class Shout(Plugin):
    """Registered under the fastgw.plugins entry point `shout` by the test."""
    name = "shout"
    phase = "rewrite"

    def on_request(self, req):
        req.headers.set("x-shout", "HELLO")
