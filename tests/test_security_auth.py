"""Authentication that resists guessing, and who the client is (the security issue, items 7 and
the client-identity part of 8): failed attempts count toward rate limits, basic_auth takes as long
for an unknown user, forwarded claims are the token's word alone, JWT dates are numbers, the rate
limit table cannot be flooded by crafted keys, and client-address headers are believed only from
trusted proxies. Everything goes through the gateway's listening socket."""
from __future__ import annotations

import asyncio
import base64
import time

import jwt
import msgspec
import pytest

import fastgw.plugins.basic_auth as basic_auth_module
from fastgw.config.model import Consumer
from fastgw.api import PluginContext
from fastgw.plugins.credentials import hash_key, hash_password, verify_password
from upstreams import HOST, gateway_config, route

SECRET = "s" * 32
CONSUMERS = [
    {"name": "acme", "credentials": {"api_keys": [hash_key("acme-key")],
                                     "basic": [{"username": "acme", "password_hash": hash_password("s3cret")}]}},
]


def api_config(upstream, plugins, **route_keys):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up", **route_keys)])
    config["routes"][0]["plugins"] = plugins
    config["consumers"] = CONSUMERS
    return config


def raw_get(path: str, *fields: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()


def basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def hs_token(**claims) -> str:
    body = {"sub": "user-7", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


def jwt_plugin(**options):
    return {"jwt": {"algorithms": ["HS256"], "secret": SECRET, **options}}


# --- basic_auth: no user enumeration by timing -----------------------------------------------------

def test_basic_auth_unknown_user_costs_the_same_scrypt_as_a_wrong_password(gateway, upstream, monkeypatch):
    # Through the gateway: an unknown user and a wrong password get the same answer.
    gw = gateway(api_config(upstream, [{"basic_auth": {}}]))
    for user, password in [("acme", "wrong"), ("nobody", "wrong")]:
        with gw.connect(timeout=10) as conn:
            resp = conn.request(raw_get("/api/x", basic(user, password)))
        assert resp.status == 401 and resp.json()["error"]["message"] == "invalid credentials"
    assert upstream.requests == []
    with gw.connect() as conn:
        assert conn.request(raw_get("/api/x", basic("acme", "s3cret"))).status == 200

    # Same cost, checked by what runs rather than by a stopwatch: both refusals run the real scrypt
    # once, with the same parameters (the unknown user's against a stand-in hash).
    ran: list[tuple[str, bool]] = []

    def recorded(stored: str, password: str) -> bool:
        ok = verify_password(stored, password)
        ran.append(("$".join(stored.split("$")[:4]), ok))
        return ok
    monkeypatch.setattr(basic_auth_module, "verify_password", recorded)
    plugin = basic_auth_module.BasicAuth(basic_auth_module.BasicAuth.Config())
    plugin.setup(PluginContext([msgspec.convert(CONSUMERS[0], Consumer)], None))

    class Req:
        def __init__(self, user):
            self.headers = {"authorization": basic(user, "wrong").partition(": ")[2]}

    for user in ("acme", "nobody"):
        answer = asyncio.run(plugin.on_request(Req(user)))
        assert answer.status == 401
    stored_params = "$".join(CONSUMERS[0]["credentials"]["basic"][0]["password_hash"].split("$")[:4])
    assert ran == [(stored_params, False), (stored_params, False)]


# --- forward_claims: the client's own header never reaches the upstream -----------------------------

@pytest.mark.parametrize("sent", [["X-Role: superuser"], ["x-role: superuser", "X-ROLE: admin"]])
def test_forward_claims_remove_the_clients_header_with_or_without_the_claim(gateway, upstream, sent):
    gw = gateway(api_config(upstream, [jwt_plugin(forward_claims={"role": "x-role", "sub": "x-user"})]))
    with gw.connect() as conn:
        without = conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(), *sent))
        assert without.status == 200
        seen = upstream.requests[-1]
        assert seen.header_all("x-role") == [] and seen.header("x-user") == "user-7"
        # The same token again (remembered, not verified again) still strips it.
        assert conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(), *sent)).status == 200
        assert upstream.requests[-1].header_all("x-role") == []
        assert conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(role="reader"), *sent)).status == 200
        assert upstream.requests[-1].header_all("x-role") == ["reader"]


@pytest.mark.parametrize("value", ["reader\r\nx-admin: yes", "r\u00f6le \u65e5\u672c", "a\x00b"])
def test_a_claim_that_is_no_header_value_is_dropped_and_logged(gateway, upstream, value):
    gw = gateway(api_config(upstream, [jwt_plugin(forward_claims={"role": "x-role", "sub": "x-user"})]))
    with gw.connect() as conn:
        resp = conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(role=value), "X-Role: superuser"))
    assert resp.status == 200, resp.body
    seen = upstream.requests[-1]
    assert seen.header_all("x-role") == [] and seen.header("x-admin") is None and seen.header("x-user") == "user-7"
    assert "claim 'role' of the token is not a header value" in gw.stderr_text()


def test_a_latin1_claim_is_forwarded(gateway, upstream):
    gw = gateway(api_config(upstream, [jwt_plugin(forward_claims={"name": "x-name"})]))
    with gw.connect() as conn:
        assert conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(name="Zo\u00eb"))).status == 200
    assert upstream.requests[-1].header("x-name") == "Zo\u00eb"


# --- JWT: exp and nbf are numbers ----------------------------------------------------------------------

@pytest.mark.parametrize("claims", [{"exp": "9999999999"}, {"nbf": True},
                                    {"nbf": "0"}, {"nbf": False}, {"exp": None, "nbf": "1"}])
def test_jwt_refuses_dates_that_are_not_numbers(gateway, upstream, claims):
    gw = gateway(api_config(upstream, [jwt_plugin(required_claims=[])]))
    with gw.connect() as conn:
        resp = conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(**claims)))
    assert resp.status == 401 and "not a NumericDate" in resp.json()["error"]["message"], resp.body
    assert upstream.requests == []


def test_jwt_accepts_fractional_dates(gateway, upstream):
    """RFC 7519 §2: a NumericDate may be non-integer."""
    gw = gateway(api_config(upstream, [jwt_plugin()]))
    with gw.connect() as conn:
        ok = conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(exp=time.time() + 300.5,
                                                                             nbf=time.time() - 10.25)))
        assert ok.status == 200, ok.body
        expired = conn.request(raw_get("/api/x", "Authorization: Bearer " + hs_token(exp=time.time() - 10.5)))
        assert expired.status == 401


# --- the rate-limit table: keyed placement, and a key it cannot hold is refused -----------------------

def test_siphash_matches_the_reference_vectors():
    from fastgw._core.ratelimit import _siphash24

    key = bytes(range(16))
    assert _siphash24(key, b"") == 0x726fdb47dd0e0e31
    assert _siphash24(key, bytes(range(8))) == 0x93f5f5799a932462
    assert _siphash24(key, bytes(range(15))) == 0xa129ca6149be45e5


def test_a_full_probe_window_refuses_instead_of_admitting():
    """16 entries: the whole table is one probe window. Once 16 keys hold it, a 17th is refused
    (fails closed) and the keys that have an entry keep their exact limit."""
    from fastgw._core import shm
    from fastgw._core.ratelimit import Policy

    seg = shm.Segment.create(workers=1, routes=1, targets=1, listeners=1, ratelimit_entries=16)
    seg.activate()
    try:
        policy = Policy("fixed_window", 3, 3600.0)
        assert all(policy.check(f"holder-{i}".encode())[0] for i in range(16))
        refused = [policy.check(b"newcomer") for _ in range(5)]
        assert [admitted for admitted, *_ in refused] == [False] * 5
        assert all(retry_after > 0 for *_, retry_after in refused)
        assert [policy.check(b"holder-0")[0] for _ in range(3)] == [True, True, False]
    finally:
        seg.close()


def _unkeyed_home(prefix_state: int, key: bytes, entries: int = 65536) -> int:
    """Where the table placed a key before it was keyed: FNV-1a 64 and the splitmix64 finaliser
    (the old fastgw/_core/buffer.pyx hash64), modulo the table size."""
    h = prefix_state
    for byte in key:
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 30
    h = (h * 0xbf58476d1ce4e5b9) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 27
    h = (h * 0x94d049bb133111eb) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
    return (h or 1) % entries


def _fnv_state(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def test_crafted_keys_cannot_flood_a_probe_window(gateway, upstream):
    """q= values computed offline to land on one probe window under the old unkeyed hash: fill it,
    and a 3/h limit still admits 3 for the next key, not all of them."""
    import msgspec

    limit = {"limit": 3, "window": "1h", "key": ["query:q"]}
    gw = gateway(api_config(upstream, [{"rate_limit": limit}]))
    state = _fnv_state(msgspec.json.encode(["api", 3, 3600.0, 0, "gcra", ["query:q"]]) + b"\0")
    base, fillers, i = 1000, [], 0
    while len(fillers) < 24:                       # homes within one 16-entry window
        i += 1
        q = f"f{i}".encode()
        if base <= _unkeyed_home(state, q) < base + 16:
            fillers.append(q)
    occupied = set()                               # linear probing, as the old table did
    for q in fillers:
        home = _unkeyed_home(state, q)
        free = [s for s in range(home, home + 16) if s not in occupied]
        if free:
            occupied.add(free[0])
    target = None
    while target is None:
        i += 1
        q = f"t{i}".encode()
        if all(s in occupied for s in range(_unkeyed_home(state, q), _unkeyed_home(state, q) + 16)):
            target = q
    with gw.connect() as conn:
        for q in fillers:
            assert conn.request(raw_get("/api/x?q=" + q.decode())).status == 200
        statuses = [conn.request(raw_get("/api/x?q=" + target.decode())).status for _ in range(10)]
    assert statuses == [200] * 3 + [429] * 7


# --- failed authentication counts toward the route's rate limit ------------------------------------------

@pytest.mark.parametrize("auth", [{"key_auth": {}}, {"key_auth": {"query": "apikey"}}])   # native, Python
@pytest.mark.parametrize("key", [["ip"], ["consumer"]])
def test_wrong_keys_are_rate_limited(gateway, upstream, auth, key):
    gw = gateway(api_config(upstream, [auth, {"rate_limit": {"limit": 3, "window": "1m", "key": key}}]))
    with gw.connect() as conn:
        statuses = [conn.request(raw_get("/api/x", f"X-Api-Key: wrong-{i}")).status for i in range(8)]
        right = conn.request(raw_get("/api/x", "X-Api-Key: acme-key"))
    # ip: decided before key_auth, every attempt counts; consumer: a refused attempt is charged
    # to the client address, and an address with no allowance left is refused before key_auth.
    assert statuses == [401] * 3 + [429] * 5
    # The address used up its allowance: the right key is refused too until it recovers (a
    # guesser learns nothing from the answers once the limit is hit).
    assert right.status == 429 and right.header("retry-after")
    assert upstream.requests == []


def test_a_consumer_limit_still_counts_per_consumer(gateway, upstream):
    gw = gateway(api_config(upstream, [{"key_auth": {}}, {"rate_limit": {"limit": 3, "window": "1m"}}]))
    with gw.connect() as conn:
        assert [conn.request(raw_get("/api/x", "X-Api-Key: acme-key")).status for _ in range(4)] == [200] * 3 + [429]
        # The consumer's own quota is spent, not the address's failure allowance.
        assert [conn.request(raw_get("/api/x", "X-Api-Key: bad")).status for _ in range(4)] == [401] * 3 + [429]


# --- who the client is: trusted proxies only ---------------------------------------------------------------

@pytest.mark.parametrize("fields", [["Forwarded: for=6.6.6.6;proto=https", "X-Real-IP: 6.6.6.6"],
                                    ["forwarded: for=6.6.6.6", "FORWARDED: by=x", "x-real-ip: 6.6.6.6"]])
def test_forwarded_and_x_real_ip_from_an_untrusted_peer_are_removed(gateway, upstream, fields):
    plain = api_config(upstream, [])
    plain["routes"].append(route("guarded", ["/guarded/**"], "up",
                                 plugins=[{"ip_filter": {"trusted_proxies": ["10.0.0.0/8"]}}]))
    plain["routes"].append(route("trusting", ["/trusting/**"], "up",
                                 plugins=[{"ip_filter": {"trusted_proxies": ["127.0.0.0/8"]}}]))
    gw = gateway(plain)
    with gw.connect() as conn:
        for path in ("/api/x", "/guarded/x"):
            assert conn.request(raw_get(path, *fields, "X-Other: kept")).status == 200
            seen = upstream.requests[-1]
            assert seen.header_all("forwarded") == [] and seen.header_all("x-real-ip") == []
            assert seen.header("x-other") == "kept" and seen.header("x-forwarded-for") == "127.0.0.1"
        assert conn.request(raw_get("/trusting/x", *fields)).status == 200     # the peer is trusted
        assert upstream.requests[-1].header("x-real-ip") == "6.6.6.6"
        assert upstream.requests[-1].header_all("forwarded")


def test_the_rate_limit_ip_key_believes_x_forwarded_for_only_from_a_trusted_proxy(gateway, upstream):
    config = api_config(upstream, [{"rate_limit": {"limit": 2, "window": "1m", "key": ["ip"]}}])
    config["routes"].append(route("behind", ["/behind/**"], "up", plugins=[
        {"rate_limit": {"limit": 2, "window": "1m", "key": ["ip"], "trusted_proxies": ["127.0.0.1/32"]}}]))
    gw = gateway(config)
    with gw.connect() as conn:
        # Untrusted peer: a new X-Forwarded-For each time does not make a new client.
        assert [conn.request(raw_get("/api/x", f"X-Forwarded-For: 10.0.0.{i}")).status
                for i in range(4)] == [200, 200, 429, 429]
        # Behind a trusted proxy the address it names is the client, read from the right.
        assert [conn.request(raw_get("/behind/x", "X-Forwarded-For: 1.1.1.1, 10.0.0.1")).status
                for _ in range(3)] == [200, 200, 429]
        assert conn.request(raw_get("/behind/x", "X-Forwarded-For: 1.1.1.1, 10.0.0.2")).status == 200
        assert conn.request(raw_get("/behind/x", "X-Forwarded-For: 10.0.0.1")).status == 429
