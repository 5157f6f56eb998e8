"""key_auth: an API key from a header, a query parameter or a cookie identifies the consumer.

Keys are kept as SHA-256 digests (`fastgw hash key`); the presented key is hashed and looked up,
so neither the config nor memory holds a usable key, and the comparison of digests says nothing
about the key. The data plane remembers keys it has verified by a keyed BLAKE2s digest (secret
per process), which is cheaper than SHA-256 and still no usable key. 401 with `WWW-Authenticate: Key` when the key is missing or unknown.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from urllib.parse import parse_qsl, urlencode

import msgspec

from fastgw._core.native import KeyAuthCheck
from fastgw.api import Plugin, Response

CHALLENGE = {"www-authenticate": 'Key realm="fastgw"'}


class KeyAuth(Plugin):
    name = "key_auth"
    phase = "access"
    priority = 1250
    authenticates = True

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        header: str | None = "x-api-key"
        query: str | None = None
        cookie: str | None = None
        hide_credentials: bool = False             # do not pass the key on to the upstream

        def __post_init__(self):
            if not (self.header or self.query or self.cookie):
                raise ValueError("name at least one of header, query, cookie")

    def setup(self, context):
        self.by_digest = {}                        # hex digest -> (stored form, consumer)
        self.by_raw_digest = {}                    # digest bytes -> (digest, name bytes): the native check's
        # The native check's memory of keys it has verified, by a keyed BLAKE2s digest (a third of
        # SHA-256's cost through OpenSSL for a short key); the secret is this process's, so the
        # table holds nothing that is, or leads to, a usable key. Rebuilt with the consumers.
        self.verified = {}
        self.verified_hasher = hashlib.blake2s(key=os.urandom(32), digest_size=16)
        for consumer in context.consumers:
            for stored in consumer.credentials.api_keys:
                hexdigest = stored.partition(":")[2]
                self.by_digest[hexdigest] = (stored, consumer)
                self.by_raw_digest[bytes.fromhex(hexdigest)] = (bytes.fromhex(hexdigest), consumer.name.encode())

    @property
    def consumes_header(self) -> bool:
        """RFC 9110 §11.7.2: a key in Proxy-Authorization is ours to consume, never passed on."""
        return (self.config.header or "").lower() == "proxy-authorization"

    def native(self):
        """The data plane does the header case itself (fastgw/_core/native.pyx)."""
        config = self.config
        if config.query or config.cookie or config.hide_credentials or not config.header or self.consumes_header:
            return None
        return KeyAuthCheck(self, self.config.header)

    def missing(self):
        return Response.error(401, "unauthorized", "an API key is required", CHALLENGE)

    def invalid(self):
        return Response.error(401, "unauthorized", "invalid API key", CHALLENGE)

    def _presented(self, req) -> tuple[str | None, str | None]:
        """(key, where it was)."""
        config = self.config
        if config.header:
            value = req.headers.get(config.header)
            if value:
                return value, "header"
        if config.query and req.query:
            value = req.query_params().get(config.query)
            if value:
                return value, "query"
        if config.cookie:
            value = req.cookie(config.cookie)
            if value:
                return value, "cookie"
        return None, None

    def on_request(self, req):
        key, where = self._presented(req)
        if key is None:
            return self.missing()
        # Hashed as the bytes that came in (latin-1 round trip), as the native check does.
        digest = hashlib.sha256(key.encode("latin-1", "replace")).hexdigest()
        found = self.by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], "sha256:" + digest):
            return self.invalid()
        req.consumer = found[1]
        if self.config.hide_credentials or where == "header" and self.consumes_header:
            self._hide(req, where)
        return None

    def _hide(self, req, where: str) -> None:
        if where == "header":
            req.headers.remove(self.config.header)
        elif where == "query":
            kept = [(k, v) for k, v in parse_qsl(req.query[1:], keep_blank_values=True) if k != self.config.query]
            req.query = "?" + urlencode(kept) if kept else ""
        else:
            req.remove_cookie(self.config.cookie)
