"""basic_auth: RFC 7617 user and password identify the consumer.

Passwords are stored as scrypt hashes (`fastgw hash password`). scrypt is deliberately slow (tens of
milliseconds), so the check runs in a thread — the event loop keeps serving — and a successful
check is remembered (by a SHA-256 of user and password, at most `cache_size` of them) so that a
client sending the same credentials again costs a dictionary lookup. A user name nobody has is
checked against a stand-in hash with the same scrypt parameters, so the time of a refusal does not
tell which user names exist.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from collections import OrderedDict

import msgspec

from fastgw.api import Plugin, Response
from fastgw.plugins.credentials import SCRYPT_N, SCRYPT_P, SCRYPT_R, verify_password


class BasicAuth(Plugin):
    name = "basic_auth"
    phase = "access"
    priority = 1100
    authenticates = True

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        realm: str = "fastgw"
        hide_credentials: bool = False
        cache_size: int = 10000

    def setup(self, context):
        self.users = {}
        for consumer in context.consumers:
            for cred in consumer.credentials.basic:
                self.users[cred.username] = (cred.password_hash, consumer)
        self.unknown_user = (self._stand_in_hash(), None)
        self.verified: OrderedDict[bytes, object] = OrderedDict()
        self.challenge = {"www-authenticate": f'Basic realm="{self.config.realm}", charset="UTF-8"'}

    def on_request(self, req):
        header = req.headers.get("authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return Response.error(401, "unauthorized", "credentials are required", self.challenge)
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            return Response.error(401, "unauthorized", "malformed Basic credentials", self.challenge)
        memo = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        consumer = self.verified.get(memo)
        if consumer is not None:
            self.verified.move_to_end(memo)
            return self._accept(req, consumer)
        return self._check(req, memo, self.users.get(user, self.unknown_user), password)

    def _stand_in_hash(self) -> str:
        """A hash no password matches (its digest is random bytes), with the parameters of the
        stored ones (the first configured; the default's without users)."""
        params = f"{SCRYPT_N}${SCRYPT_R}${SCRYPT_P}"
        for stored, _ in self.users.values():
            if stored.startswith("scrypt$") and stored.count("$") == 5:
                params = "$".join(stored.split("$")[1:4])
                break
        salt, digest = (base64.b64encode(os.urandom(n)).decode() for n in (16, 32))
        return f"scrypt${params}${salt}${digest}"

    async def _check(self, req, memo: bytes, stored, password: str):
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, stored[0], password)
        if not ok or stored[1] is None:
            return Response.error(401, "unauthorized", "invalid credentials", self.challenge)
        self.verified[memo] = stored[1]
        if len(self.verified) > self.config.cache_size:
            self.verified.popitem(last=False)
        return self._accept(req, stored[1])

    def _accept(self, req, consumer):
        req.consumer = consumer
        if self.config.hide_credentials:
            req.headers.remove("authorization")
        return None
