"""Response aggregation (`routes[].aggregate`): one client call, several backend calls, one JSON
answer.

Backends run concurrently through the gateway's own data plane (fastgw/handlers/loopback.py), so
each call is balanced, pooled, health-checked, retried and circuit-broken like a proxied request.
A backend whose path uses a field of another's result (`/stock/{product.sku}`) waits for that
one: backends are run in stages, each stage as soon as the ones it needs have answered.

Results are merged under their `into` key, or flat into the answer without one, after that
backend's `allow`/`deny`/`rename`. An `optional` backend that fails is left out and the answer
says `X-Fastgw-Completed: false`; a required one failing makes the answer a 502 that names it.
"""
from __future__ import annotations

import asyncio
import re
from urllib.parse import quote

import msgspec

from fastgw.handlers.loopback import Answer, Call, CallFailed, LoopbackClient
from fastgw.handlers.shape import Shape
from fastgw.api import Response

_decode = msgspec.json.Decoder().decode
_VAR = re.compile(r"\{([^{}]+)\}")
# Client headers every backend call carries (besides x-request-id, traceparent and the consumer).
PASSED_HEADERS = ("authorization", "accept-language", "user-agent", "x-forwarded-for")
DEFAULT_TIMEOUT = 10.0


class BackendFailed(Exception):
    pass


class Backend:
    def __init__(self, spec, index: int, names: dict[str, int]):
        self.spec = spec
        self.label = spec.into or spec.service
        self.parts: list[str | tuple[str, ...]] = []     # literals and variable paths
        self.needs: set[int] = set()
        pos = 0
        for m in _VAR.finditer(spec.path):
            self.parts.append(spec.path[pos:m.start()])
            path = tuple(m.group(1).split("."))
            if len(path) > 1:
                if path[0] not in names:
                    raise ValueError(f"{{{m.group(1)}}}: no backend has into: {path[0]}")
                if names[path[0]] == index:
                    raise ValueError(f"{{{m.group(1)}}} refers to this backend's own result")
                self.needs.add(names[path[0]])
            self.parts.append(path)
            pos = m.end()
        self.parts.append(spec.path[pos:])
        self.shape = Shape(spec.allow, spec.deny, spec.rename) \
            if spec.allow or spec.deny or spec.rename else None
        self.headers = tuple(h.lower() for h in (*PASSED_HEADERS, *spec.headers))

    def target(self, params: dict[str, str], results: dict[str, object], query: str) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif len(part) == 1 and part[0] in params:
                out.append(params[part[0]])                # already as the client sent it
            else:
                value = results
                for key in part:
                    if not isinstance(value, dict) or key not in value:
                        raise BackendFailed(f"{{{'.'.join(part)}}} is not in the results")
                    value = value[key]
                if isinstance(value, (dict, list)) or value is None:
                    raise BackendFailed(f"{{{'.'.join(part)}}} is not a single value")
                out.append(quote(str(value).lower() if isinstance(value, bool) else str(value), safe=""))
        return "".join(out) + (query if self.spec.pass_query else "")


def _stages(backends: list[Backend]) -> list[list[int]]:
    """Backends grouped so that each runs after everything it needs; ValueError on a cycle."""
    level: dict[int, int] = {}

    def depth(i: int, seen: tuple[int, ...]) -> int:
        if i in seen:
            raise ValueError(f"backends {[backends[j].label for j in (*seen, i)]} need each other")
        if i not in level:
            level[i] = 1 + max((depth(j, (*seen, i)) for j in backends[i].needs), default=-1)
        return level[i]

    for i in range(len(backends)):
        depth(i, ())
    stages: list[list[int]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for i, lvl in sorted(level.items()):
        stages[lvl].append(i)
    return stages


class Aggregator:
    """The handler of one aggregate route (see fastgw._core.protocol: handler routes)."""

    def __init__(self, spec, loopback: LoopbackClient, shapes: dict[str, Shape] | None,
                 route_timeout: float | None, services: set[str]):
        names = {b.into: i for i, b in enumerate(spec.backends) if b.into}
        self.backends = []
        for i, b in enumerate(spec.backends):
            if b.service not in services:
                raise ValueError(f"backends[{i}].service: unknown service {b.service!r}")
            try:
                self.backends.append(Backend(b, i, names))
            except ValueError as exc:
                raise ValueError(f"backends[{i}].path: {exc}") from None
        self.stages = _stages(self.backends)
        self.timeout = spec.timeout or route_timeout or DEFAULT_TIMEOUT
        self.max_bytes = spec.max_body_bytes
        self.loopback = loopback
        self.shapes = shapes
        self.header_names = sorted({h for b in self.backends for h in b.headers})

    async def handle(self, view, params: dict[str, str], body: bytes, forward: dict[str, str],
                     profile: str | None) -> Response:
        loop = asyncio.get_running_loop()
        headers = dict(forward)
        for name in self.header_names:
            value = view.headers.get(name) if name != "x-forwarded-for" else view.forwarded_for
            if value is not None:
                headers[name] = value
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        by_label: dict[str, object] = {}          # `into` key -> result, for chained paths
        outcome: dict[int, object] = {}           # backend index -> result or BackendFailed
        running: dict[int, Call] = {}
        # One timer for all the calls: at the deadline, whatever has not answered fails.
        timer = loop.call_later(self.timeout, _expire, running, self.timeout)
        try:
            for stage in self.stages:
                for i in stage:
                    try:
                        running[i] = self._start(loop, self.backends[i], view, params, lines, body,
                                                 by_label, outcome)
                    except BackendFailed as exc:
                        outcome[i] = exc
                for i in stage:
                    if i in running:
                        outcome[i] = await self._result(self.backends[i], running[i])
                        del running[i]
                        if self.backends[i].spec.into and not isinstance(outcome[i], BackendFailed):
                            by_label[self.backends[i].spec.into] = outcome[i]
        finally:
            timer.cancel()
            _expire(running, self.timeout)        # the client went away: drop what still runs
        merged: dict = {}
        complete = True
        for i, backend in enumerate(self.backends):
            result = outcome[i]
            if isinstance(result, BackendFailed):
                if not backend.spec.optional:
                    return Response.error(502, "aggregate_backend_failed",
                                          f"backend {backend.label} (service {backend.spec.service}) "
                                          f"failed: {result}")
                complete = False
            elif backend.spec.into:
                merged[backend.spec.into] = result
            else:
                merged.update(result)
        shape = self.shapes.get(profile) if self.shapes and profile is not None else None
        if shape is not None:
            merged = shape.apply(merged)
        return Response(200, {"content-type": "application/json",
                              "x-fastgw-completed": "true" if complete else "false"}, json=merged)

    def _start(self, loop, backend: Backend, view, params, headers: str, body, by_label, outcome):
        for needed in backend.needs:
            if isinstance(outcome[needed], BackendFailed):
                raise BackendFailed(f"it needs backend {self.backends[needed].label}, which failed")
        target = backend.target(params, by_label, "?" + view.query if view.query else "")
        return self.loopback.start(loop, backend.spec.service, backend.spec.method, target, host=view.host,
                                   client_ip=view.client_ip, headers=headers,
                                   body=body if backend.spec.pass_body else b"", max_bytes=self.max_bytes)

    @staticmethod
    async def _result(backend: Backend, call: Call):
        """The backend's filtered JSON, or BackendFailed saying why not."""
        try:
            answer: Answer = await call.done
        except CallFailed as exc:
            return BackendFailed(str(exc))
        if not 200 <= answer.status < 300:
            return BackendFailed(f"status {answer.status}")
        if "json" not in answer.headers.get("content-type", ""):
            return BackendFailed("the answer is not JSON (content-type)")
        try:
            value = _decode(answer.body)
        except msgspec.DecodeError:
            return BackendFailed("the answer is not valid JSON")
        if backend.shape is not None:
            value = backend.shape.apply(value)
        if not backend.spec.into and not isinstance(value, dict):
            return BackendFailed("a backend without `into` must answer a JSON object")
        return value


def _expire(running: dict, timeout: float) -> None:
    for call in running.values():
        call.cancel(CallFailed(f"no answer within {timeout:g}s"))
