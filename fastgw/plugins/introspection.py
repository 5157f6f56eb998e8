"""oauth2_introspection: an opaque bearer token is checked with the authorization server's
introspection endpoint (RFC 7662).

An answer is remembered until the token's `exp` (at most `cache_ttl`, at most `cache_size`
tokens), and concurrent requests with the same unknown token share one call to the endpoint. An
inactive token is 401; an endpoint that cannot be reached (or answers anything but 200 JSON) is
503 `introspection_unavailable` — never a request let through unchecked.
"""
from __future__ import annotations

import asyncio
import base64
import time
from collections import OrderedDict
from urllib.parse import quote, urlencode

import msgspec

from fastgw.config.model import Duration
from fastgw.api import Plugin, Response, accept_token, token_consumers
from fastgw.plugins.fetch import FetchError, fetch
from fastgw.log import log

CHALLENGE = {"www-authenticate": 'Bearer realm="fastgw"'}


class Introspection(Plugin):
    name = "oauth2_introspection"
    phase = "access"
    priority = 1400
    authenticates = True

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        endpoint: str
        client_id: str
        client_secret: str
        endpoint_ca: str | None = None
        timeout: Duration = 2.0
        cache_ttl: Duration = 300.0                # also for tokens without exp
        cache_size: int = 10000
        forward: dict[str, str] = {}               # introspection field -> request header
        header: str = "authorization"

        def __post_init__(self):
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError("endpoint must be an http(s) URL")

    def __init__(self, config):
        super().__init__(config)
        credentials = f"{quote(config.client_id, safe='')}:{quote(config.client_secret, safe='')}"
        self.authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        self.known: OrderedDict[str, tuple[dict, float]] = OrderedDict()   # token -> (answer, until)
        self.pending: dict[str, asyncio.Future] = {}
        self.by_subject: dict = {}

    def setup(self, context):
        self.by_subject = token_consumers(context.consumers)

    def on_request(self, req):
        value = req.headers.get(self.config.header) or ""
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Response.error(401, "unauthorized", "a bearer token is required", CHALLENGE)
        known = self.known.get(token)
        if known is not None and time.time() < known[1]:
            self.known.move_to_end(token)
            return self._decide(req, known[0])
        return self._introspect_then_decide(req, token)

    async def _introspect_then_decide(self, req, token: str):
        shared = self.pending.get(token)
        if shared is None:
            shared = self.pending[token] = asyncio.ensure_future(self._introspect(token))
            shared.add_done_callback(lambda _: self.pending.pop(token, None))
        try:
            answer = await asyncio.shield(shared)
        except FetchError as exc:
            log(f"oauth2_introspection: {exc}", "error")
            return Response.error(503, "introspection_unavailable", "the token could not be checked now")
        return self._decide(req, answer)

    async def _introspect(self, token: str) -> dict:
        status, _, body = await fetch(
            self.config.endpoint, method="POST", timeout=self.config.timeout, ca=self.config.endpoint_ca,
            headers={"Authorization": self.authorization, "Accept": "application/json",
                     "Content-Type": "application/x-www-form-urlencoded"},
            body=urlencode({"token": token, "token_type_hint": "access_token"}).encode())
        if status != 200:
            raise FetchError(f"introspection endpoint answered {status}")
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise FetchError("introspection endpoint did not answer JSON") from None
        if not isinstance(answer, dict):
            raise FetchError("introspection answer is not a JSON object")
        until = time.time() + self.config.cache_ttl
        exp = answer.get("exp")
        if isinstance(exp, (int, float)):
            until = min(until, exp)
        if until > time.time():                   # inactive answers too: they stay inactive
            self.known[token] = (answer, until)
            if len(self.known) > self.config.cache_size:
                self.known.popitem(last=False)
        return answer

    def _decide(self, req, answer: dict):
        if answer.get("active") is not True:
            return Response.error(401, "unauthorized", "the token is not active", CHALLENGE)
        exp = answer.get("exp")
        if isinstance(exp, (int, float)) and exp <= time.time():
            return Response.error(401, "unauthorized", "the token has expired", CHALLENGE)
        accept_token(req, answer, self.config.forward, self.by_subject)
        req.ctx["introspection"] = answer
        return None
