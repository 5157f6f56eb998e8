"""pytest-benchmark micro suites for the hot functions: router lookup at 10, 1,000 and 10,000
routes (should stay flat), and processing a request head end to end in the client protocol.

Run: pytest benchmarks --benchmark-only  (compare runs with --benchmark-autosave and
--benchmark-compare)."""
import msgspec
import pytest

from benchmarks.routes import lookups, route_table
from fastgw.runtime.build import compile_config
from fastgw.config.model import Config, dec_hook


def _runtime(routes, services=None, **more):
    config = msgspec.convert({
        "listeners": [{"name": "b", "bind": "127.0.0.1:1"}],
        "services": services or {"api": {"targets": [{"address": "127.0.0.1:9"}]}},
        "routes": routes, **more,
    }, Config, dec_hook=dec_hook)
    return compile_config(config)


@pytest.mark.parametrize("size", [10, 1000, 10000])
def test_router_lookup(benchmark, size):
    router = _runtime(route_table(size)).router
    requests = lookups(size)
    hits = [router.lookup(m, "", p) for m, p in requests]
    assert sum(h is not None for h in hits) >= 1

    def run():
        for method, path in requests:
            router.lookup(method, "", path)

    benchmark(run)


class _Transport:
    """The least a protocol needs from a transport to answer; counts what it writes."""

    def __init__(self):
        self.written = 0

    def write(self, data):
        self.written += len(data)
        self.last = bytes(data)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False


REQUEST = (b"GET /hello/world?x=1 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: bench/1.0\r\n"
           b"Accept: */*\r\nAccept-Encoding: gzip\r\nX-Request-Id: abc\r\n\r\n")


def test_request_head_to_local_answer(benchmark):
    """Parse a typical head, route it, answer from a `respond` route: the per-request cost of the
    client side with no upstream."""
    import asyncio

    from fastgw._core.protocol import ListenerState

    runtime = _runtime([{"name": "hello", "match": {"paths": ["/hello/{name}"]},
                         "respond": {"status": 200, "body": "ok"}}])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    state = ListenerState("b", runtime.router, loop=loop)
    transport = _Transport()

    async def make():
        conn = state.protocol_factory()
        conn.connection_made(transport)
        return conn

    conn = loop.run_until_complete(make())
    conn.data_received(REQUEST)
    assert transport.written > 0

    benchmark(conn.data_received, REQUEST)
    loop.close()


PLUGIN_CASES = {
    "none": ([], b""),
    "noop_python": ([{"request_id": {"echo_downstream": False}}], b""),
    "key_auth": ([{"key_auth": {}}], b"X-Api-Key: bench-key\r\n"),
    "ip_filter": ([{"ip_filter": {"allow": ["127.0.0.0/8"]}}], b""),
    "rate_limit": ([{"rate_limit": {"limit": 1000000000, "key": ["ip"]}}], b""),
    "key_auth+rate_limit": ([{"key_auth": {}}, {"rate_limit": {"limit": 1000000000}}],
                            b"X-Api-Key: bench-key\r\n"),
    "jwt_cached": ([{"jwt": {"algorithms": ["HS256"], "secret": "s" * 32}}], None),
}


@pytest.mark.parametrize("case", list(PLUGIN_CASES))
def test_request_head_to_local_answer_with_plugins(benchmark, case):
    """The same as test_request_head_to_local_answer, on a route with plugins: the difference is
    what the plugin machinery and each plugin cost per request (no upstream)."""
    import asyncio
    import hashlib
    import time

    import jwt

    from fastgw._core.protocol import ListenerState

    plugins, header = PLUGIN_CASES[case]
    if header is None:
        token = jwt.encode({"sub": "b", "exp": int(time.time()) + 3600}, "s" * 32, algorithm="HS256")
        header = f"Authorization: Bearer {token}\r\n".encode()
    runtime = _runtime([{"name": "hello", "match": {"paths": ["/hello/{name}"]}, "plugins": plugins,
                         "respond": {"status": 200, "body": "ok"}}],
                       consumers=[{"name": "b", "credentials": {
                           "api_keys": ["sha256:" + hashlib.sha256(b"bench-key").hexdigest()]}}])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    state = ListenerState("b", runtime.router, loop=loop)
    transport = _Transport()
    request = REQUEST[:-2] + header + b"\r\n"

    async def make():
        conn = state.protocol_factory()
        conn.connection_made(transport)
        return conn

    conn = loop.run_until_complete(make())
    before = transport.written
    conn.data_received(request)
    assert transport.written - before > 0 and transport.last.startswith(b"HTTP/1.1 200"), transport.last[:80]

    benchmark(conn.data_received, request)
    loop.close()


def test_shm_record_request(benchmark):
    """What counting one request in shared memory costs (atomics into the route's counters and
    histogram), measured through the Python wrapper: compare with test_python_call_baseline,
    which is the wrapper's own call cost."""
    from fastgw._core import shm

    seg = shm.Segment.create(workers=1, routes=4, targets=4, listeners=1, ratelimit_entries=1)
    seg.activate()
    record = shm._record_request

    def run():
        for _ in range(1000):
            record(1, b"GET", 200, 0.0012)

    benchmark(run)
    assert seg.route_duration(1)[2] >= 1000
    seg.close()


def test_python_call_baseline(benchmark):
    from fastgw._core import shm

    noop = shm._listener_closed            # no segment active: returns at once

    def run():
        for _ in range(1000):
            noop(-1)

    benchmark(run)


@pytest.mark.parametrize("size", [1000, 10000])
def test_rebuild_one_changed_route(benchmark, size):
    """A reload that changes one route: unchanged routes are reused, the trie is rebuilt."""
    import copy

    def config_of(routes):
        return msgspec.convert({
            "listeners": [{"name": "b", "bind": "127.0.0.1:1"}],
            "services": {"api": {"targets": [{"address": "127.0.0.1:9"}]}},
            "routes": routes}, Config, dec_hook=dec_hook)

    routes = route_table(size)
    before = compile_config(config_of(routes))
    changed = copy.deepcopy(routes)
    changed[size // 2]["match"]["paths"] = ["/changed/{id}"]
    after_config = config_of(changed)
    rt = benchmark(compile_config, after_config, None, before)
    assert rt.router.lookup("GET", "", "/changed/7")[0].route.name == f"r{size // 2}"


@pytest.mark.parametrize("size", [10000])
def test_build_from_scratch(benchmark, size):
    config = msgspec.convert({
        "listeners": [{"name": "b", "bind": "127.0.0.1:1"}],
        "services": {"api": {"targets": [{"address": "127.0.0.1:9"}]}},
        "routes": route_table(size)}, Config, dec_hook=dec_hook)
    benchmark.pedantic(compile_config, args=(config,), rounds=5)


@pytest.mark.parametrize("algorithm", ["round_robin", "weighted_round_robin", "least_conn", "p2c_ewma",
                                       "consistent_hash", "random", "nearest"])
def test_balancer_pick(benchmark, algorithm):
    """1,000 picks over 8 targets with shared-memory slots (health, in-flight, EWMA words read on
    every pick), through the Python entry point `choose`: subtract test_python_call_baseline."""
    from fastgw._core import shm
    from fastgw._core.balancer import make_balancer
    from fastgw._core.upstream import Service

    seg = shm.Segment.create(workers=1, routes=1, targets=8, listeners=1, ratelimit_entries=1)
    seg.activate()
    service = Service("s")
    targets = [service.add_target(f"10.0.0.{i}:80", 1 + i % 3, i) for i in range(8)]
    balancer = make_balancer(algorithm, targets, 1.25 if algorithm == "consistent_hash" else 0.0)
    keys = [f"user-{i}".encode() for i in range(1000)]

    def run():
        for key in keys:
            balancer.choose(key)

    benchmark(run)
    seg.close()


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window", "fixed_window", "concurrency"])
def test_rate_limit_decision(benchmark, algorithm):
    """1,000 decisions over 100 keys in the shared-memory table, through the Python entry point
    `check` (subtract test_python_call_baseline): the decision itself is a hash, a probe and one CAS."""
    from fastgw._core import shm
    from fastgw._core.ratelimit import Policy

    seg = shm.Segment.create(workers=1, routes=1, targets=1, listeners=1, ratelimit_entries=65536)
    seg.activate()
    policy = Policy(algorithm, 1_000_000_000, 1.0)
    keys = [f"consumer-{i % 100}".encode() for i in range(1000)]

    def run():
        for key in keys:
            policy.check(key)

    benchmark(run)
    seg.close()
