"""The public plugin API: what a plugin is, and the request and response it sees (README.md,
"Plugins").

It sits at the bottom of the package layers (README.md, "Layers"): the data plane (`fastgw._core`)
builds these objects and the plugins subclass them, so it imports nothing of fastgw but the logger.

A plugin runs in one phase:

    rewrite   before access control: change the request (headers) before anyone judges it
    access    authenticate, authorise, filter: may answer locally (401, 403, 429, a preflight)
    response  the upstream's answer (or a local one) is about to go out: change its status line's
              headers
    log       the exchange is over: look at it (never changes anything; errors are only logged)

Within a phase, a higher `priority` runs first; global plugins (top-level `plugins:`) run before a
route's own at equal priority. `on_request` may be a coroutine function: the request waits for it
without holding up any other connection (the client's reads pause meanwhile).

A route without plugins (and no global ones) never creates any of these objects.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Iterable, Iterator
from urllib.parse import parse_qsl

import msgspec

from fastgw.log import log

PHASES = ("rewrite", "access", "response", "log")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")     # field-vchar, SP, HTAB; latin-1


class Plugin:
    """Base class of every plugin, built-in or user-written.

    Subclasses set `name`, `phase` and `priority`, and may define a nested msgspec `Config` Struct:
    the plugin's config mapping is decoded into it at config load (unknown keys are errors), and
    the instance is built with it once per worker and config (kept across reloads while its config
    does not change, so caches survive)."""

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "access"
    priority: ClassVar[int] = 0
    # An authentication plugin: it lets a request through on a credential (and names its consumer
    # when it can). Where it reads it: Authorization, the header and cookie its config's `header`
    # and `cookie` name, the TLS client certificate; the cache keys an answer by the consumer, else
    # by a digest of those (fastgw/plugins/chain.py).
    authenticates: ClassVar[bool] = False

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        pass

    def __init__(self, config: Any) -> None:
        self.config = config

    def on_request(self, req: "Request") -> "Response | None":
        """rewrite/access phases: return a Response to answer locally (the upstream is not asked),
        or None to go on. May be `async def`."""
        return None

    def on_response(self, req: "Request", resp: "Response") -> None:
        """response phase: change `resp.status` / `resp.headers` of the answer about to go out."""

    def on_log(self, req: "Request", resp: "Response") -> None:
        """log phase: the exchange is over."""

    def setup(self, context: "PluginContext") -> None:
        """Called once after construction with what the plugin may need from the config (the
        consumers, for authentication plugins)."""


class PluginContext:
    """What the compiled config offers plugins: the consumers, and the cluster settings."""

    def __init__(self, consumers: list, cluster=None) -> None:
        self.consumers = consumers                  # fastgw.config.model.Consumer
        self.cluster = cluster                      # fastgw.config.model.Cluster or None


def token_consumers(consumers: list) -> dict:
    """(issuer, subject) -> consumer, from `credentials.jwt` (JWT and introspected tokens alike)."""
    return {(c.issuer, c.subject): consumer for consumer in consumers for c in consumer.credentials.jwt}


def accept_token(req, fields: dict, forward: dict, consumers: dict) -> None:
    """A verified token's fields: `forward` copies some into request headers (JSON unless a
    string), and the consumer its issuer and subject name becomes the request's.

    A forwarded header is the token's word alone: the client's own field of that name is removed
    whether or not the token has the claim. A value that is not a valid field value (RFC 9110
    §5.5: no CR, LF, NUL or other controls; one byte per character) is left out, and logged."""
    for field, header in forward.items():
        req.headers.remove(header)
        value = fields.get(field)
        if value is None:
            continue
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        if _FIELD_VALUE.fullmatch(text):
            req.headers.set(header, text)
        else:
            log(f"claim {field!r} of the token is not a header value; {header} not sent "
                f"(route {req.route}, request {req.request_id})", "warning")
    consumer = consumers.get((fields.get("iss"), fields.get("sub")))
    if consumer is not None:
        req.consumer = consumer


class Headers:
    """Header fields as (name, value) str pairs in order; names compare case-insensitively.

    Built from the data plane's raw list ([name, value, ...] bytes) and decoded only when a plugin
    first needs more than a lookup, so a plugin that reads one header pays for one. Changes are
    tracked so that only a changed list is written back to the request."""

    __slots__ = ("_raw", "_items", "changed")

    def __init__(self, items: Iterable[tuple[str, str]] = (), raw: list | None = None) -> None:
        self._raw = raw                             # undecoded, until _pairs() is needed
        self._items = None if raw is not None else list(items)
        self.changed = False

    def _pairs(self) -> list:
        if self._items is None:
            raw = self._raw
            self._items = [(raw[i].decode("latin-1"), raw[i + 1].decode("latin-1"))
                           for i in range(0, len(raw), 2)]
            self._raw = None
        return self._items

    def get(self, name: str, default: str | None = None) -> str | None:
        if self._items is None:                     # straight off the raw list
            wanted = name.lower().encode("latin-1")
            size = len(wanted)
            raw = self._raw
            for i in range(0, len(raw), 2):
                if len(raw[i]) == size and raw[i].lower() == wanted:
                    return raw[i + 1].decode("latin-1")
            return default
        name = name.lower()
        for k, v in self._items:
            if k.lower() == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._pairs() if k.lower() == name]

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: str) -> None:
        self.set(name, value)

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name with one."""
        self.remove(name)
        self._pairs().append((name, value))
        self.changed = True

    def add(self, name: str, value: str) -> None:
        self._pairs().append((name, value))
        self.changed = True

    def remove(self, name: str) -> None:
        lower = name.lower()
        items = self._pairs()
        kept = [(k, v) for k, v in items if k.lower() != lower]
        if len(kept) != len(items):
            self._items = kept
            self.changed = True

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs())

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._pairs())

    def __len__(self) -> int:
        return len(self._pairs())

    def __repr__(self) -> str:
        return f"Headers({self._pairs()!r})"


class Request:
    """The request as plugins see it. `headers` are the ones sent upstream (Host is `host`;
    X-Forwarded-For is `forwarded_for`, to which the gateway appends the client);
    `client_ip` is the peer's address, or the one a PROXY header gave on a listener that accepts
    it (`peer_ip` is always the socket's). `query` (with its "?") may be changed; so may
    `headers`. Authentication plugins set `consumer`; any plugin may keep per-request state in
    `ctx`."""

    __slots__ = ("method", "host", "path", "query", "headers", "client_ip", "peer_ip", "route",
                 "request_id", "forwarded_for", "consumer", "ctx", "tls_peer")

    def __init__(self, method: str, host: str, path: str, query: str, headers: Headers,
                 client_ip: str, peer_ip: str, route: str, request_id: str = "",
                 forwarded_for: str | None = None, tls_peer: dict | None = None) -> None:
        self.method, self.host, self.path, self.query = method, host, path, query
        self.request_id = request_id
        self.headers = headers
        self.client_ip, self.peer_ip, self.route = client_ip, peer_ip, route
        self.forwarded_for = forwarded_for          # the X-Forwarded-For chain the client sent
        self.consumer = None                        # fastgw.config.model.Consumer once identified
        self.ctx: dict = {}
        self.tls_peer = tls_peer                    # the client certificate (ssl getpeercert()), mTLS

    def query_params(self) -> dict[str, str]:
        """The query string's parameters (first value of each), decoded."""
        params: dict[str, str] = {}
        for key, value in parse_qsl(self.query[1:] if self.query.startswith("?") else self.query,
                                    keep_blank_values=True):
            params.setdefault(key, value)
        return params

    def cookie(self, name: str) -> str | None:
        for header in self.headers.get_all("cookie"):
            for part in header.split(";"):
                key, _, value = part.strip().partition("=")
                if key == name:
                    return value
        return None

    def remove_cookie(self, name: str) -> None:
        """Drop the cookie `name` from the Cookie header(s), keeping the others in one field."""
        kept = [part.strip() for header in self.headers.get_all("cookie") for part in header.split(";")
                if part.strip() and part.strip().partition("=")[0] != name]
        self.headers.remove("cookie")
        if kept:
            self.headers.set("cookie", "; ".join(kept))


class Response:
    """A local answer (returned from on_request) or the answer going out (on_response).
    `json` is encoded when given; else `body` (bytes or str). A route handler may instead set
    `stream`, an async iterator of body chunks, sent chunked as they come."""

    __slots__ = ("status", "headers", "body", "stream")

    def __init__(self, status: int = 200, headers: Headers | dict | Iterable | None = None, *,
                 body: bytes | str = b"", json: Any = msgspec.UNSET) -> None:
        self.status = status
        if isinstance(headers, Headers):
            self.headers = headers
        else:
            self.headers = Headers(headers.items() if isinstance(headers, dict) else headers or ())
        if json is not msgspec.UNSET:
            body = msgspec.json.encode(json)
            if "content-type" not in self.headers:
                self.headers.add("content-type", "application/json")
        self.body = body.encode() if isinstance(body, str) else body
        self.stream = None

    @classmethod
    def error(cls, status: int, code: str, message: str, headers: dict | None = None) -> "Response":
        """The gateway's JSON error shape (README.md, "Proxy behaviour", **Errors**); the request id is
        added when it is sent."""
        return cls(status, headers, json={"error": {"status": status, "code": code, "message": message}})
