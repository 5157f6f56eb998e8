"""The cache never hands one identity's answer to another: the verified identity (consumer, else a
keyed digest of the credential) is part of the key on routes with an authentication plugin, and
the upstream's `Vary` (RFC 9111 §4.1) stores one answer per variant, `Vary: *` none."""
from __future__ import annotations

import concurrent.futures
import http.client
import ssl
import time

import jwt

from certs import make_ca_and_certs
from upstreams import HOST, RecordingUpstream, Reply, free_port, get_request, proxy_config

SECRET = "s" * 32


def token(sub, **claims):
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 300, **claims}, SECRET, algorithm="HS256")


def cookie_subject(req) -> str:
    """Who the request is for, as a backend reading the session cookie sees it."""
    for part in (req.header("cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "session":
            return jwt.decode(value, options={"verify_signature": False})["sub"]
    return "nobody"


def profile_upstream(req):
    """/me/profile: the caller's own page, with no Vary (the backend trusts the gateway's key)."""
    return Reply(200, [("Content-Type", "text/plain"), ("Content-Language", "en")],
                 f"profile of {cookie_subject(req)}".encode())


def jwt_cookie_config(port, consumers=(), admin=False):
    config = proxy_config(port, plugins=[{"jwt": {"algorithms": ["HS256"], "secret": SECRET, "cookie": "session"}},
                                         {"cache": {"ttl": "30s"}}])
    config["consumers"] = list(consumers)
    if admin:
        config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    return config


def session(tok):
    return {"Cookie": f"theme=dark; session={tok}"}


def test_jwt_cookie_without_consumers_keys_by_credential(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(profile_upstream))
    gw = gateway(jwt_cookie_config(upstream.port, admin=True))
    alice, bob = token("alice-1"), token("bob-2")
    a1 = gw.request("GET", "/me/profile", headers=session(alice))
    bob_head = gw.request("HEAD", "/me/profile", headers=session(bob))
    b1 = gw.request("GET", "/me/profile", headers=session(bob))
    a2 = gw.request("GET", "/me/profile", headers=session(alice))
    b2 = gw.request("GET", "/me/profile", headers=session(bob))
    assert [r.body for r in (a1, b1, a2, b2)] == [b"profile of alice-1", b"profile of bob-2"] * 2
    assert [r.header("x-cache") for r in (a1, b1, a2, b2)] == ["MISS", "MISS", "HIT", "HIT"]
    # HEAD is answered from GET entries, but only from the same identity's.
    assert bob_head.header("x-cache") == "MISS" and [r.method for r in upstream.requests] == ["GET", "HEAD", "GET"]
    # The same token in the Authorization header is the same credential but read elsewhere: its own entry.
    bearer = gw.request("GET", "/me/profile", headers={"Authorization": f"Bearer {alice}"})
    assert bearer.header("x-cache") == "MISS" and bearer.body == b"profile of nobody"
    assert gw.request("GET", "/me/profile").status == 401                # auth still runs before the cache
    # A purge by key names no credential and reaches every identity's entry.
    purged = gw.admin("POST", "/cache/purge", {"key": f"GET 127.0.0.1:{gw.port} /me/profile"}).json()
    assert purged == {"purged": 3}
    assert gw.request("GET", "/me/profile", headers=session(bob)).header("x-cache") == "MISS"


def test_jwt_cookie_with_consumers_keys_by_consumer(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(profile_upstream))
    consumers = [{"name": name, "credentials": {"jwt": [{"issuer": "https://auth.test", "subject": sub}]}}
                 for name, sub in (("alice", "alice-1"), ("bob", "bob-2"))]
    gw = gateway(jwt_cookie_config(upstream.port, consumers))
    issued = lambda sub, n: token(sub, iss="https://auth.test", jti=str(n))        # noqa: E731
    a1 = gw.request("GET", "/me/profile", headers=session(issued("alice-1", 1)))
    b1 = gw.request("GET", "/me/profile", headers=session(issued("bob-2", 2)))
    a2 = gw.request("GET", "/me/profile", headers=session(issued("alice-1", 3)))   # a new token, same consumer
    b2 = gw.request("GET", "/me/profile", headers=session(issued("bob-2", 4)))
    assert [r.body for r in (a1, b1, a2, b2)] == [b"profile of alice-1", b"profile of bob-2"] * 2
    assert [r.header("x-cache") for r in (a1, b1, a2, b2)] == ["MISS", "MISS", "HIT", "HIT"]
    assert [r.header("x-consumer-name") for r in upstream.requests] == ["alice", "bob"]


def test_mtls_certificates_without_consumers_keep_their_own_entries(gateway, start_upstream, tmp_path):
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(200, [], f"n={len(upstream.requests)}".encode())))
    ca, server = make_ca_and_certs(tmp_path, ["gw.test"])
    client_ca, clients = make_ca_and_certs(tmp_path, ["client-a", "client-b"], prefix="clients-")
    config = proxy_config(upstream.port, plugins=[{"mtls_auth": {"require_consumer": False}},
                                                  {"cache": {"ttl": "30s"}}])
    config["listeners"][0].update(protocol="https", tls={
        "certificates": [{"cert": str(server["gw.test"][0]), "key": str(server["gw.test"][1])}],
        "client_ca": str(client_ca), "client_auth": "required"})
    gw = gateway(config)

    def get(client):
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False
        context.load_cert_chain(*map(str, clients[client]))
        conn = http.client.HTTPSConnection(HOST, gw.port, context=context, timeout=5)
        try:
            conn.request("GET", "/report")
            resp = conn.getresponse()
            return resp.read(), resp.getheader("x-cache")
        finally:
            conn.close()
    assert [get(c) for c in ("client-a", "client-b", "client-a", "client-b")] == [
        (b"n=1", "MISS"), (b"n=2", "MISS"), (b"n=1", "HIT"), (b"n=2", "HIT")]


def vary_upstream(req):
    """Answers in the request's language and for its session cookie, and says so in Vary."""
    language = req.header("accept-language") or "none"
    return Reply(200, [("Content-Type", "text/plain"), ("Vary", "accept-language"), ("VARY", "Cookie"),
                       ("Content-Language", language)],
                 f"{language} for {req.header('cookie') or 'anyone'}".encode())


def test_vary_stores_one_answer_per_variant(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(vary_upstream))
    config = proxy_config(upstream.port, plugins=[{"cache": {"ttl": "30s"}}])
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config)
    get = lambda **headers: gw.request("GET", "/page", headers=headers)         # noqa: E731
    en, de = get(**{"Accept-Language": "en"}), get(**{"Accept-Language": "de"})
    en2, de2 = get(**{"Accept-Language": "en"}), get(**{"Accept-Language": " de "})   # trimmed
    assert [r.body for r in (en, de, en2, de2)] == [b"en for anyone", b"de for anyone"] * 2
    assert [r.header("x-cache") for r in (en, de, en2, de2)] == ["MISS", "MISS", "HIT", "HIT"]
    assert get(**{"Accept-Language": "EN"}).header("x-cache") == "MISS"        # values compare exactly
    assert get().body == b"none for anyone"                                   # absent is its own variant
    # Vary: Cookie: one session's answer never goes to another, nor to a client without cookie.
    alice = get(**{"Accept-Language": "en", "Cookie": "sid=alice"})
    bob = get(**{"Accept-Language": "en", "Cookie": "sid=bob"})
    assert (alice.body, alice.header("x-cache")) == (b"en for sid=alice", "MISS")
    assert (bob.body, bob.header("x-cache")) == (b"en for sid=bob", "MISS")
    assert get(**{"Accept-Language": "en", "Cookie": "sid=alice"}).header("x-cache") == "HIT"
    # HEAD is served only from the entry of its own variant.
    head_fr = gw.request("HEAD", "/page", headers={"Accept-Language": "fr"})
    head_de = gw.request("HEAD", "/page", headers={"Accept-Language": "de"})
    assert (head_fr.header("x-cache"), head_fr.header("content-language")) == ("MISS", "fr")
    assert (head_de.header("x-cache"), head_de.header("content-language")) == ("HIT", "de")
    assert sum(r.method == "HEAD" for r in upstream.requests) == 1
    purged = gw.admin("POST", "/cache/purge", {"key": f"GET 127.0.0.1:{gw.port} /page"}).json()
    assert purged == {"purged": 6}                                            # every variant of the key
    assert get(**{"Accept-Language": "en"}).header("x-cache") == "MISS"


def test_repeated_vary_fields_are_combined(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(
        200, [("Vary", "Accept-Language")], ", ".join(req.header_all("accept-language")).encode())))
    gw = gateway(proxy_config(upstream.port, plugins=[{"cache": {"ttl": "30s"}}]))
    with gw.connect() as conn:
        two = conn.request(get_request("/r", headers=[("Accept-Language", "en"), ("Accept-Language", "de")]))
        one = conn.request(get_request("/r", headers=[("Accept-Language", "en, de")]))
        first = conn.request(get_request("/r", headers=[("Accept-Language", "en")]))
    assert (two.body, two.header("x-cache")) == (b"en, de", "MISS")
    assert (one.body, one.header("x-cache")) == (b"en, de", "HIT")       # the same field value, combined
    assert (first.body, first.header("x-cache")) == (b"en", "MISS")


def test_vary_star_is_not_stored_and_variants_are_bounded(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(
        200, [("Vary", "*" if req.path == "/star" else "X-Forwarded-For" if req.path == "/by-client" else
                "Accept-Language, X-Tier" if req.path == "/two" else
                "X-Variant")], (req.header("x-variant") or "").encode())))
    gw = gateway(proxy_config(upstream.port, plugins=[{"cache": {"ttl": "30s"}}]))
    assert [gw.request("GET", "/star").header("x-cache") for _ in range(2)] == ["MISS", "MISS"]
    # X-Forwarded-For is the gateway's own (with the client's address): the client's value says
    # nothing of what the upstream saw.
    assert [gw.request("GET", "/by-client").header("x-cache") for _ in range(2)] == ["MISS", "MISS"]
    # Vary naming several fields: all must match.
    tiered = [gw.request("GET", "/two", headers={"Accept-Language": "en", "X-Tier": tier})
              for tier in ("gold", "free", "gold")]
    assert [r.header("x-cache") for r in tiered] == ["MISS", "MISS", "HIT"]
    # At most 16 variants per key: a 17th pushes out the least recently used one.
    for n in range(17):
        assert gw.request("GET", "/many", headers={"X-Variant": str(n)}).header("x-cache") == "MISS"
    assert gw.request("GET", "/many", headers={"X-Variant": "16"}).header("x-cache") == "HIT"
    assert gw.request("GET", "/many", headers={"X-Variant": "1"}).header("x-cache") == "HIT"
    assert gw.request("GET", "/many", headers={"X-Variant": "0"}).header("x-cache") == "MISS"


def test_coalesced_waiters_of_another_variant_go_upstream(gateway, start_upstream):
    def slow(req):
        time.sleep(0.6)
        return vary_upstream(req)
    upstream = start_upstream(RecordingUpstream(slow))
    gw = gateway(proxy_config(upstream.port, plugins=[{"cache": {"ttl": "30s"}}]))

    def get(language, delay):
        time.sleep(delay)
        return gw.request("GET", "/slow", headers={"Accept-Language": language})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(get, ["en", "de", "en", "de"], [0, 0.15, 0.2, 0.25]))
    assert [r.body for r in answers] == [b"en for anyone", b"de for anyone"] * 2
    assert [r.header("x-cache") for r in answers] == ["MISS", "MISS", "HIT", "HIT"]
    assert [r.header("accept-language") for r in upstream.requests] == ["en", "de"]
