"""jwt: a signed JSON Web Token (RFC 7519) in `Authorization: Bearer` (or a cookie) lets the
request through, verified with PyJWT.

Keys: `secret` for HS*, `public_keys` (PEM files) for RS*/PS*/ES*/EdDSA, or a `jwks_url` fetched
asynchronously by each worker — at first use, every `jwks_refresh`, and again when a token names a
`kid` we do not have (at most once per `jwks_cooldown`, one fetch in flight at a time). When the
JWKS endpoint fails, the keys fetched before are kept.

Only the configured `algorithms` are accepted (never `none`), and a key is only used for the
algorithm family it belongs to: an HS token cannot be checked against an RSA public key used as
an HMAC secret (the classic algorithm confusion). `exp`, `nbf`, `iss` and `aud` are checked with
`leeway`; `exp` and `nbf` must be JSON numbers (a fraction is fine, as RFC 7519 allows; a string or
a boolean is refused). A verified token is remembered (at most `cache_size`, until it expires), so a client
repeating it costs a dictionary lookup. `forward_claims` copies claims into request headers; a
consumer whose `credentials.jwt` names the token's issuer and subject becomes the request's consumer
(with `require_consumer`, a token no consumer claims is refused). `hide_credentials` removes the
token from what the upstream receives; a token read from Proxy-Authorization is always removed
(RFC 9110 §11.7.2: that field is for the proxy that consumes it).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from pathlib import Path

import jwt
import msgspec
from jwt.algorithms import get_default_algorithms

from fastgw.config.model import Duration
from fastgw.api import Plugin, Response, accept_token, token_consumers
from fastgw.plugins.fetch import FetchError, fetch
from fastgw.log import log

HMAC = ("HS256", "HS384", "HS512")
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
CHALLENGE = {"www-authenticate": 'Bearer realm="fastgw"'}


def _not_numeric_date(claims: dict) -> str | None:
    """`exp` or `nbf` when it is not a JSON number (RFC 7519 §2 NumericDate: seconds, integer or
    not). PyJWT reads them with int(), which takes "9999999999" and true as well."""
    for name in ("exp", "nbf"):
        value = claims.get(name)
        if name in claims and (type(value) not in (int, float) or not math.isfinite(value)):
            return name
    return None


def _family(alg: str) -> str:
    return {"HS": "oct", "RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}[alg[:2]]


class JwtAuth(Plugin):
    name = "jwt"
    phase = "access"
    priority = 1450
    authenticates = True

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        algorithms: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
        issuer: str | None = None
        audiences: list[str] = []
        leeway: Duration = 0.0
        secret: str | None = None                  # HS*
        public_keys: list[str] = []                # PEM files: RS*, PS*, ES*, EdDSA
        jwks_url: str | None = None
        jwks_ca: str | None = None                 # CA file for an https JWKS URL (default: system)
        jwks_refresh: Duration = 600.0
        jwks_cooldown: Duration = 30.0
        header: str = "authorization"              # "Bearer <token>"
        cookie: str | None = None
        hide_credentials: bool = False             # do not pass the token on to the upstream
        require_consumer: bool = False             # true: a token no consumer claims is refused
        forward_claims: dict[str, str] = {}        # claim -> request header
        required_claims: list[str] = msgspec.field(default_factory=lambda: ["exp"])
        cache_size: int = 10000

        def __post_init__(self):
            for alg in self.algorithms:
                if alg not in HMAC + ASYMMETRIC:
                    raise ValueError(f"algorithm {alg!r} is not one of {', '.join(HMAC + ASYMMETRIC)}")
            if any(a in HMAC for a in self.algorithms) and not self.secret:
                raise ValueError("HS* algorithms need a secret")
            if self.secret and not all(a in HMAC for a in self.algorithms):
                if tuple(self.algorithms) == DEFAULT_ALGORITHMS:
                    raise ValueError("a secret is for HS* algorithms, and the default algorithms are "
                                     f"{', '.join(DEFAULT_ALGORITHMS)}: add algorithms: [HS256] "
                                     "(or HS384, HS512)")
                raise ValueError("a secret is only for HS* algorithms: list them alone")
            if any(a in ASYMMETRIC for a in self.algorithms) and not (self.public_keys or self.jwks_url):
                raise ValueError("RS/PS/ES/EdDSA algorithms need public_keys or a jwks_url")
            for path in self.public_keys:
                if not Path(path).is_file():
                    raise ValueError(f"public key file {path!r} does not exist")

    def __init__(self, config):
        super().__init__(config)
        algorithms = get_default_algorithms()
        self.static_keys: list = []               # (family, key, kid None)
        for path in config.public_keys:
            pem = Path(path).read_bytes()
            for name in ("RS256", "ES256", "EdDSA"):
                try:
                    key = algorithms[name].prepare_key(pem)
                except Exception:                 # noqa: BLE001 - not this family's key
                    continue
                self.static_keys.append((_family(name), key))
                break
            else:
                raise ValueError(f"{path}: not an RSA, EC or Ed25519/Ed448 public key in PEM")
        self.jwks: dict = {}                      # kid -> PyJWK
        self.jwks_fetched_at = 0.0                # monotonic; 0 = never
        self.jwks_tried_at = 0.0
        self.jwks_task: asyncio.Future | None = None
        self.verified: OrderedDict[str, tuple] = OrderedDict()   # token -> (claims, exp)
        self.by_subject: dict = {}
        # RFC 9110 §11.7.2: Proxy-Authorization is for the proxy that consumes it, never passed on.
        self.consumes_header = config.header.lower() == "proxy-authorization"

    def setup(self, context):
        self.by_subject = token_consumers(context.consumers)

    # --- the request ---------------------------------------------------------------------------

    def _token(self, req) -> tuple[str | None, str | None]:
        """(token, where it was: "header" or "cookie")."""
        value = req.headers.get(self.config.header)
        if value:
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip(), "header"
        if self.config.cookie:
            token = req.cookie(self.config.cookie)
            if token is not None:
                return token, "cookie"
        return None, None

    def on_request(self, req):
        token, _ = self._token(req)
        if token is None:
            return Response.error(401, "unauthorized", "a bearer token is required", CHALLENGE)
        remembered = self.verified.get(token)
        if remembered is not None:
            claims, exp = remembered
            if exp is None or time.time() <= exp + self.config.leeway:
                self.verified.move_to_end(token)
                return self._accept(req, claims)
            del self.verified[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return self._reject("malformed token")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.config.algorithms:
            return self._reject(f"algorithm {alg!r} is not accepted")
        if alg in HMAC or not self.config.jwks_url:
            return self._verify(req, token, alg, kid)
        now = time.monotonic()
        if self.jwks_fetched_at and now - self.jwks_fetched_at >= self.config.jwks_refresh:
            self._start_fetch(now)                 # due: refresh in the background, verify now
        if self._keys_for(alg, kid) or self.jwks_task is None and now - self.jwks_tried_at < self.config.jwks_cooldown:
            return self._verify(req, token, alg, kid)
        return self._verify_after_fetch(req, token, alg, kid)

    async def _verify_after_fetch(self, req, token, alg, kid):
        """A kid we do not know (a key rotation?), or no keys yet: fetch the JWKS, then verify."""
        self._start_fetch(time.monotonic())
        if self.jwks_task is not None:
            await asyncio.shield(self.jwks_task)
        return self._verify(req, token, alg, kid)

    def _verify(self, req, token: str, alg: str, kid):
        config = self.config
        keys = [config.secret] if alg in HMAC else self._keys_for(alg, kid)
        if not keys:
            return self._reject(f"no key for kid {kid!r}" if kid else "no key for the token")
        failure = "invalid signature"
        for key in keys:
            try:
                claims = jwt.decode(token, key, algorithms=[alg], issuer=config.issuer,
                                    audience=config.audiences or None, leeway=config.leeway,
                                    options={"require": config.required_claims,
                                             "verify_aud": bool(config.audiences)})
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                failure = str(exc) or type(exc).__name__
                break
            wrong = _not_numeric_date(claims)
            if wrong:
                failure = f"{wrong} is not a NumericDate"
                break
            self._remember(token, claims)
            return self._accept(req, claims)
        return self._reject(failure)

    def _remember(self, token: str, claims: dict) -> None:
        exp = claims.get("exp")
        self.verified[token] = (claims, exp if isinstance(exp, (int, float)) else None)
        if len(self.verified) > self.config.cache_size:
            self.verified.popitem(last=False)

    def _accept(self, req, claims: dict):
        config = self.config
        if config.require_consumer and (claims.get("iss"), claims.get("sub")) not in self.by_subject:
            return self._reject("its issuer and subject name no consumer")
        accept_token(req, claims, config.forward_claims, self.by_subject)
        req.ctx["jwt_claims"] = claims
        if self.consumes_header or config.hide_credentials:
            self._hide(req)
        return None

    def _hide(self, req) -> None:
        """Remove the token from where it came (what `_token` found first)."""
        _, where = self._token(req)
        if where == "header":
            req.headers.remove(self.config.header)
        elif where == "cookie" and self.config.hide_credentials:
            req.remove_cookie(self.config.cookie)

    @staticmethod
    def _reject(why: str):
        return Response.error(401, "unauthorized", f"invalid token: {why}", CHALLENGE)

    # --- keys ----------------------------------------------------------------------------------

    def _keys_for(self, alg: str, kid) -> list:
        family = _family(alg)
        keys = [key for fam, key in self.static_keys if fam == family]
        if kid is not None:
            jwk = self.jwks.get(kid)
            if jwk is not None and jwk.key_type == family:
                keys.append(jwk.key)
        else:
            keys += [jwk.key for jwk in self.jwks.values() if jwk.key_type == family]
        return keys

    def _start_fetch(self, now: float) -> None:
        """Fetch the JWKS unless a fetch is in flight or one started within the cooldown."""
        if self.jwks_task is None and now - self.jwks_tried_at >= self.config.jwks_cooldown:
            self.jwks_tried_at = now
            self.jwks_task = asyncio.ensure_future(self._fetch_jwks())

    async def _fetch_jwks(self) -> None:
        try:
            status, _, body = await fetch(self.config.jwks_url, ca=self.config.jwks_ca, timeout=5.0)
            if status != 200:
                raise FetchError(f"status {status}")
            keys = jwt.PyJWKSet.from_json(body.decode()).keys
        except (FetchError, jwt.PyJWTError, ValueError, UnicodeDecodeError) as exc:
            log(f"jwt: JWKS {self.config.jwks_url} not fetched ({exc}); keeping "
                f"{len(self.jwks)} known keys", "warning")
        else:
            self.jwks = {k.key_id: k for k in keys if k.key_id}
            self.jwks_fetched_at = time.monotonic()
        finally:
            self.jwks_task = None
