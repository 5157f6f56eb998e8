"""jwt and oauth2_introspection through the gateway, against a real JWKS server and a real
introspection endpoint (RecordingUpstreams), with keys generated now."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from upstreams import HOST, RecordingUpstream, Reply, free_port, gateway_config, route

ISSUER = "https://auth.test"


@pytest.fixture(scope="module")
def keys():
    return {"rsa1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "ed": ed25519.Ed25519PrivateKey.generate()}


def jwk(kid, key):
    public = key.public_key()
    algorithm = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else \
        ECAlgorithm if isinstance(public, ec.EllipticCurvePublicKey) else OKPAlgorithm
    return {**algorithm.to_jwk(public, as_dict=True), "kid": kid}


class JwksServer(RecordingUpstream):
    def __init__(self):
        self.keys: list[dict] = []
        self.status = 200
        super().__init__(name="jwks", handler=self._answer)

    def _answer(self, req):
        if self.status != 200:
            return Reply(self.status, [("Content-Length", "0")])
        return Reply(200, [("Content-Type", "application/json")], json.dumps({"keys": self.keys}).encode())


def token(key, alg="RS256", kid="k1", **claims):
    body = {"iss": ISSUER, "aud": "api", "sub": "user-7", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def bearer(value):
    return {"authorization": f"Bearer {value}"}


def jwt_gateway(gateway, upstream, plugin, consumers=()):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up")])
    config["routes"][0]["plugins"] = [{"jwt": plugin}]
    config["consumers"] = list(consumers)
    return gateway(config)


def test_jwks_tokens_claims_rotation_and_outage(gateway, upstream, start_upstream, keys):
    jwks = start_upstream(JwksServer())
    jwks.keys = [jwk("k1", keys["rsa1"])]
    gw = jwt_gateway(gateway, upstream, {
        "issuer": ISSUER, "audiences": ["api"], "algorithms": ["RS256", "ES256"], "leeway": "5s",
        "jwks_url": f"http://{HOST}:{jwks.port}/jwks.json", "jwks_cooldown": "1s",
        "forward_claims": {"sub": "x-user-id", "scope": "x-scope"}},
        consumers=[{"name": "seven", "credentials": {"jwt": [{"issuer": ISSUER, "subject": "user-7"}]}}])
    good = token(keys["rsa1"], scope="read write")
    resp = gw.request("GET", "/api/x", headers=bearer(good))
    assert resp.status == 200, resp.body
    seen = upstream.requests[-1]
    assert seen.header("x-user-id") == "user-7" and seen.header("x-scope") == "read write"
    assert seen.header("x-consumer-name") == "seven"
    fetches = len(jwks.requests)
    assert fetches == 1
    for _ in range(5):                                   # cached: no more fetches
        assert gw.request("GET", "/api/x", headers=bearer(good)).status == 200
    assert len(jwks.requests) == fetches
    # Rejections, each with the reason.
    for bad, why in [
        (token(keys["rsa1"], exp=int(time.time()) - 60), "expired"),
        (token(keys["rsa1"], nbf=int(time.time()) + 60), "not yet valid"),
        (token(keys["rsa1"], iss="https://evil.test"), "issuer"),
        (token(keys["rsa1"], aud="other"), "audience"),
        (token(keys["rsa1"], exp=None), "exp"),
        (good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"), "signature"),
        (jwt.encode({"iss": ISSUER, "aud": "api", "exp": int(time.time()) + 60}, None, algorithm="none"), "none"),
        ("not.a.token", "malformed"),
    ]:
        resp = gw.request("GET", "/api/x", headers=bearer(bad))
        assert resp.status == 401, why
        assert resp.header("www-authenticate") == 'Bearer realm="fastgw"'
    assert gw.request("GET", "/api/x").status == 401
    # Within leeway.
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa1"], exp=int(time.time()) - 2))).status == 200
    # Rotation: a new key under a new kid is fetched on first sight (once the cooldown since the
    # last fetch is over), without a restart.
    jwks.keys = [jwk("k1", keys["rsa1"]), jwk("k2", keys["rsa2"]), jwk("e1", keys["ec"])]
    time.sleep(1.1)
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa2"], kid="k2"))).status == 200
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["ec"], alg="ES256", kid="e1"))).status == 200
    assert len(jwks.requests) == fetches + 1
    # Unknown kids do not hammer the JWKS endpoint: one fetch per cooldown.
    for i in range(5):
        assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa2"], kid=f"nope{i}"))).status == 401
    assert len(jwks.requests) <= fetches + 2
    # The JWKS endpoint goes down: the keys fetched before keep working.
    jwks.status = 500
    time.sleep(1.1)
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa2"], kid="k3"))).status == 401   # fetch fails
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa2"], kid="k2", sub="u2"))).status == 200
    assert "JWKS" in gw.stderr_text() and "keeping 3 known keys" in gw.stderr_text()


def test_algorithm_confusion_and_static_keys(gateway, upstream, keys, tmp_path):
    pem = keys["rsa1"].public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pem").write_bytes(pem)
    (tmp_path / "ed.pem").write_bytes(keys["ed"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    gw = jwt_gateway(gateway, upstream, {"algorithms": ["RS256", "PS256", "EdDSA"],
                                         "public_keys": [str(tmp_path / "rsa.pem"), str(tmp_path / "ed.pem")]})
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa1"], kid=None))).status == 200
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["rsa1"], alg="PS256", kid=None))).status == 200
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["ed"], alg="EdDSA", kid=None))).status == 200
    # HS256 signed with the RSA public key as the HMAC secret: refused (HS256 is not accepted here,
    # and an RSA key is never used as an HMAC secret).
    import hashlib
    import hmac
    import base64
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "exp": int(time.time()) + 60}).encode())
    forged = head + b"." + payload
    forged += b"." + b64(hmac.new(pem, forged, hashlib.sha256).digest())
    resp = gw.request("GET", "/api/x", headers=bearer(forged.decode()))
    assert resp.status == 401 and "HS256" in resp.json()["error"]["message"]
    # An ES256 token where only RSA and Ed keys exist: no key of that family.
    assert gw.request("GET", "/api/x", headers=bearer(token(keys["ec"], alg="ES256", kid=None))).status == 401


def test_hs256_secret(gateway, upstream):
    gw = jwt_gateway(gateway, upstream, {"algorithms": ["HS256"], "secret": "s" * 32, "audiences": ["api"]})
    assert gw.request("GET", "/api/x", headers=bearer(token("s" * 32, alg="HS256", kid=None))).status == 200
    assert gw.request("GET", "/api/x", headers=bearer(token("t" * 32, alg="HS256", kid=None))).status == 401


# --- oauth2_introspection ------------------------------------------------------------------------

class IntrospectionServer(RecordingUpstream):
    def __init__(self):
        self.tokens = {"good": {"active": True, "sub": "user-9", "scope": "read", "client_id": "web"}}
        self.down = False
        self.delay = 0.2
        self.lock = threading.Lock()
        super().__init__(name="introspect", handler=self._answer)

    def _answer(self, req):
        if self.down:
            return Reply(502, [("Content-Length", "0")])
        time.sleep(self.delay)
        form = dict(pair.split("=", 1) for pair in req.body.decode().split("&"))
        answer = self.tokens.get(form["token"], {"active": False})
        return Reply(200, [("Content-Type", "application/json")], json.dumps(answer).encode())


def test_introspection_cached_single_flight_inactive_and_down(gateway, upstream, start_upstream):
    server = start_upstream(IntrospectionServer())
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up")])
    config["routes"][0]["plugins"] = [{"oauth2_introspection": {
        "endpoint": f"http://{HOST}:{server.port}/introspect", "client_id": "gw", "client_secret": "pw",
        "forward": {"sub": "x-user-id", "scope": "x-scope"}}}]
    gw = gateway(config)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: gw.request("GET", "/api/x", headers=bearer("good")).status, range(10)))
    assert statuses == [200] * 10
    assert len(server.requests) == 1                     # one call for ten concurrent requests
    call = server.requests[0]
    assert call.method == "POST" and call.header("authorization") == "Basic Z3c6cHc="
    assert upstream.requests[-1].header("x-user-id") == "user-9" and upstream.requests[-1].header("x-scope") == "read"
    assert gw.request("GET", "/api/x", headers=bearer("good")).status == 200
    assert len(server.requests) == 1                     # cached
    resp = gw.request("GET", "/api/x", headers=bearer("revoked"))
    assert resp.status == 401 and "not active" in resp.json()["error"]["message"]
    server.down = True
    resp = gw.request("GET", "/api/x", headers=bearer("other"))
    assert resp.status == 503 and resp.json()["error"]["code"] == "introspection_unavailable"
    assert gw.request("GET", "/api/x", headers=bearer("good")).status == 200      # still cached
    stopped = free_port()
    config["routes"][0]["plugins"][0]["oauth2_introspection"]["endpoint"] = f"http://{HOST}:{stopped}/x"
    config["listeners"][0]["bind"] = f"{HOST}:{free_port()}"
    unreachable = gateway(config)
    assert unreachable.request("GET", "/api/x", headers=bearer("good")).status == 503


# --- options: the HS256 hint, require_consumer, hide_credentials ----------------------------------

SECRET = "s" * 32


def test_secret_without_algorithms_says_to_add_hs256(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "gw.yaml").write_text(
        "version: 1\n"
        "listeners: [{name: public, bind: 127.0.0.1:18080}]\n"
        "services: {up: {targets: [{address: 127.0.0.1:9}]}}\n"
        "routes:\n"
        "  - name: api\n"
        "    service: up\n"
        "    plugins:\n"
        "      - jwt:\n"
        f"          secret: {SECRET}\n")
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", "gw.yaml"], cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "gw.yaml:8: routes[0].plugins[0].jwt: " in done.stdout + done.stderr
    assert "add algorithms: [HS256] (or HS384, HS512)" in done.stdout + done.stderr


def test_require_consumer(gateway, upstream):
    known = {"name": "seven", "credentials": {"jwt": [{"issuer": ISSUER, "subject": "user-7"}]}}
    stranger = token(SECRET, alg="HS256", kid=None, sub="nobody")
    member = token(SECRET, alg="HS256", kid=None)
    lenient = jwt_gateway(gateway, upstream, {"algorithms": ["HS256"], "secret": SECRET}, consumers=[known])
    assert lenient.request("GET", "/api/a", headers=bearer(stranger)).status == 200   # the default: false
    assert upstream.requests[-1].header("x-consumer-name") is None
    strict = jwt_gateway(gateway, upstream, {"algorithms": ["HS256"], "secret": SECRET, "require_consumer": True},
                         consumers=[known])
    before = len(upstream.requests)
    for _ in range(2):                                   # the second time from the verified-token cache
        resp = strict.request("GET", "/api/b", headers=bearer(stranger))
        assert resp.status == 401 and "no consumer" in resp.json()["error"]["message"]
        assert resp.header("www-authenticate") == 'Bearer realm="fastgw"'
    assert len(upstream.requests) == before
    resp = strict.request("GET", "/api/c", headers=bearer(member))
    assert resp.status == 200 and upstream.requests[-1].header("x-consumer-name") == "seven"


def test_hide_credentials(gateway, upstream):
    good = token(SECRET, alg="HS256", kid=None)
    shown = jwt_gateway(gateway, upstream, {"algorithms": ["HS256"], "secret": SECRET, "cookie": "session"})
    assert shown.request("GET", "/api/a", headers=bearer(good)).status == 200
    assert upstream.requests[-1].header("authorization") == f"Bearer {good}"
    hidden = jwt_gateway(gateway, upstream, {"algorithms": ["HS256"], "secret": SECRET, "cookie": "session",
                                             "hide_credentials": True})
    with hidden.connect() as conn:
        # The header however it is written; other headers and cookies stay.
        resp = conn.request(f"GET /api/b HTTP/1.1\r\nHost: x\r\nAUTHORIZATION: bearer {good}\r\n"
                            f"Cookie: theme=dark\r\nX-Other: 1\r\n\r\n".encode())
    assert resp.status == 200
    seen = upstream.requests[-1]
    assert seen.header("authorization") is None and "authorization" not in seen.raw_head.decode().lower()
    assert seen.header("cookie") == "theme=dark" and seen.header("x-other") == "1"
    # From the cookie: that cookie goes, the others and a non-Bearer Authorization stay.
    resp = hidden.request("GET", "/api/c", headers={"cookie": f"theme=dark; session={good}; lang=fr",
                                                    "authorization": "Basic dXNlcjpwYXNz"})
    assert resp.status == 200
    seen = upstream.requests[-1]
    assert seen.header("cookie") == "theme=dark; lang=fr" and good not in seen.raw_head.decode()
    assert seen.header("authorization") == "Basic dXNlcjpwYXNz"
    # Without the option, the cookie is passed on as it came.
    assert shown.request("GET", "/api/d", headers={"cookie": f"session={good}"}).status == 200
    assert upstream.requests[-1].header("cookie") == f"session={good}"
