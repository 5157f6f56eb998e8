"""Cluster scope: three gateway nodes on this machine share a rate limit through a real
redis-server; Redis goes away mid-run and comes back."""
from __future__ import annotations

import collections
import threading
import time

import pytest

from test_ratelimit import hammer
from upstreams import HOST, free_port, gateway_config, route, wait_for

WINDOW = 4.0


def cluster_config(upstream, redis_port, **limit):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up")])
    config["routes"][0]["plugins"] = [{"rate_limit": {"limit": 300, "window": f"{WINDOW:g}s",
                                                      "algorithm": "fixed_window", "key": ["route"],
                                                      "scope": "cluster", "sync_interval": "50ms", **limit}}]
    config["cluster"] = {"redis": f"redis://{HOST}:{redis_port}/0", "key_prefix": f"t{free_port()}:"}
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    return config


def start_nodes(gateway, upstream, redis_port, n=3, **limit):
    config = cluster_config(upstream, redis_port, **limit)
    nodes = []
    for _ in range(n):
        node = dict(config, listeners=[{"name": "public", "bind": f"{HOST}:{free_port()}"}],
                    admin={"bind": f"{HOST}:{free_port()}"})
        nodes.append(gateway(node))
    return nodes


def next_window_start(margin=0.05):
    """Sleep until just after a cluster window begins (windows are numbered on the wall clock)."""
    now = time.time()
    time.sleep((now // WINDOW + 1) * WINDOW - now + margin)


def hammer_all(nodes, seconds):
    results, threads = {}, []
    for node in nodes:
        def one(node=node):
            results[node.port] = hammer(node.port, "/api/x", seconds, threads=3)
        threads.append(threading.Thread(target=one))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return {port: collections.Counter(s for _, s in r) for port, r in results.items()}


def test_three_nodes_admit_the_cluster_limit_together(gateway, upstream, redis_servers):
    """Batched: every 50 ms each node settles its reserve with Redis."""
    store = redis_servers()
    nodes = start_nodes(gateway, upstream, store.port)
    time.sleep(0.3)                                    # every node has registered itself
    next_window_start()
    per_node = hammer_all(nodes, 3.0)                  # inside one 4 s window
    admitted = sum(c[200] for c in per_node.values())
    print(f"\ncluster 300/4s over 3 nodes: admitted {admitted} ({[c[200] for c in per_node.values()]})")
    assert 0.95 * 300 <= admitted <= 300, per_node
    assert all(c[429] > 0 for c in per_node.values())
    # Only two nodes busy: they get the idle one's share at the syncs (not 2 x 100).
    next_window_start()
    per_node = hammer_all(nodes[:2], 3.0)
    admitted = sum(c[200] for c in per_node.values())
    print(f"cluster 300/4s, 2 of 3 nodes busy: admitted {admitted} ({[c[200] for c in per_node.values()]})")
    assert 0.95 * 300 <= admitted <= 300, per_node


def test_per_request_decisions_are_exact(gateway, upstream, redis_servers):
    """sync_interval 0: one atomic Redis count per request, so the cluster admits the limit exactly,
    whichever node a request reaches."""
    store = redis_servers()
    nodes = start_nodes(gateway, upstream, store.port, sync_interval=0)
    time.sleep(0.3)
    next_window_start()
    per_node = hammer_all(nodes[:2], 2.0)
    admitted = sum(c[200] for c in per_node.values())
    print(f"\ncluster 300/4s per request, 2 of 3 nodes busy: admitted {admitted}")
    assert admitted == 300, per_node
    resp = nodes[2].request("GET", "/api/x")
    assert resp.status == 429 and resp.header("ratelimit").startswith('"api";r=0;')
    store.stop()                                      # away: local shares (limit / nodes) each
    assert wait_for(lambda: "cluster store unreachable" in nodes[0].stderr_text(), timeout=5)
    next_window_start()
    per_node = hammer_all(nodes, 2.0)
    assert [c[200] for c in per_node.values()] == [100, 100, 100], per_node


@pytest.mark.parametrize("on_error", ["local", "allow", "deny"])
def test_redis_outage_follows_on_store_error_and_recovers(gateway, upstream, redis_servers, on_error):
    store = redis_servers()
    port = store.port
    nodes = start_nodes(gateway, upstream, port, on_store_error=on_error)
    time.sleep(0.3)
    store.stop()
    assert wait_for(lambda: "cluster store unreachable" in nodes[0].stderr_text(), timeout=5)
    next_window_start()
    per_node = hammer_all(nodes, 2.0)
    admitted = [c[200] for c in per_node.values()]
    if on_error == "local":
        assert admitted == [100, 100, 100], per_node      # limit / nodes each
    elif on_error == "allow":
        assert all(c[429] == 0 for c in per_node.values()) and sum(admitted) > 300
    else:
        assert admitted == [0, 0, 0]
    redis_servers(port)                                     # back, on the same port: no restart needed
    assert wait_for(lambda: "reachable again" in nodes[0].stderr_text(), timeout=5)
    next_window_start()
    per_node = hammer_all(nodes, 2.0)
    assert 0.95 * 300 <= sum(c[200] for c in per_node.values()) <= 300, per_node


def test_cluster_scope_config_errors(tmp_path, upstream):
    import subprocess
    import sys

    import yaml
    config = cluster_config(upstream, 1)
    del config["cluster"]
    config["routes"][0]["plugins"].append({"rate_limit": {"limit": 5, "scope": "cluster", "algorithm": "gcra"}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode == 1
    assert "routes[0].plugins[0].rate_limit.scope" in text and "cluster.redis" in text
    assert "routes[0].plugins[1].rate_limit" in text and "fixed_window" in text


def test_config_sync_spreads_admin_changes_to_every_node(gateway, upstream, redis_servers):
    store = redis_servers()
    prefix = f"cs{free_port()}:"

    def node_config():
        config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                                [route("api", ["/api/**"], "up")])
        config["listeners"] = [{"name": "public", "bind": f"{HOST}:{free_port()}"}]
        config["admin"] = {"bind": f"{HOST}:{free_port()}"}
        config["cluster"] = {"redis": f"redis://{HOST}:{store.port}/0", "key_prefix": prefix, "config_sync": True}
        return config
    a, b = gateway(node_config()), gateway(node_config())
    assert b.request("GET", "/new/x").status == 404
    resp = a.admin("PUT", "/routes/new", {"name": "new", "match": {"paths": ["/new/**"]},
                                          "respond": {"status": 200, "body": "everywhere"}})
    assert resp.status == 200, resp.body
    changed = time.monotonic()
    assert wait_for(lambda: b.request("GET", "/new/x").status == 200, timeout=3)
    print(f"\nconfig_sync: node b serves the new route {time.monotonic() - changed:.2f} s after the change")
    assert time.monotonic() - changed < 1.5
    assert "new" in [r["name"] for r in __import__("yaml").safe_load(b.config_path.read_text())["routes"]]
    late = gateway(node_config())                       # starts after the change: picks it up
    assert wait_for(lambda: late.request("GET", "/new/x").status == 200, timeout=3)
    store.stop()                                         # Redis away: every node keeps its config
    assert wait_for(lambda: "cluster config store unreachable" in b.stderr_text(), timeout=3)
    assert [n.request("GET", "/new/x").status for n in (a, b, late)] == [200, 200, 200]
    assert a.request("GET", "/api/x").status == 200
