"""Prometheus text exposition (format 0.0.4) of the shared-memory counters, summed over workers
by construction: every worker adds into the same words. Rendered on scrape, in the supervisor;
the data plane makes no Python call to count.

Request counters and histograms are written only for cells and slots that
have counted something, so 10,000 idle routes do not cost 10,000 histograms per scrape."""
from __future__ import annotations

from fastgw._core.shm import BUCKETS

_BOUNDS = [repr(b) for b in BUCKETS] + ["+Inf"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP fastgw_{name} {help_text}")
        self.lines.append(f"# TYPE fastgw_{name} {kind}")

    def sample(self, name: str, value, **labels) -> None:
        self.lines.append(f"fastgw_{name}{_labels(**labels)} {value}")

    def histogram(self, name: str, buckets: list[int], total: float, count: int, **labels) -> None:
        cumulative = 0
        for bound, n in zip(_BOUNDS, buckets):
            cumulative += n
            self.sample(f"{name}_bucket", cumulative, **labels, le=bound)
        self.sample(f"{name}_sum", repr(total), **labels)
        self.sample(f"{name}_count", count, **labels)


def render(segment, labels: dict) -> str:
    """`labels` names the slots of the running config (fastgw/admin/api.py, metric_labels)."""
    w = _Writer()
    routes, targets, listeners = labels["routes"], labels["targets"], labels["listeners"]
    if not any(slot == 0 for slot, _, _ in routes):
        routes = [(0, "", "")] + list(routes)          # slot 0: requests that matched no route

    w.family("http_requests_total", "counter", "Requests answered, by route, service, method and status.")
    for slot, route, service in routes:
        for method, code, n in segment.route_requests(slot):
            w.sample("http_requests_total", n, route=route, service=service, method=method, code=code)
    w.family("http_request_duration_seconds", "histogram",
             "Time from the complete request head to the end of the response.")
    for slot, route, service in routes:
        buckets, total, count = segment.route_duration(slot)
        if count:
            w.histogram("http_request_duration_seconds", buckets, total, count, route=route, service=service)

    events = [(route, segment.route_events(slot)) for slot, route, _ in routes if route]
    w.family("ratelimit_decisions_total", "counter", "Rate-limit decisions, by route and result.")
    for route, e in events:
        if any(e["ratelimit"].values()):
            for result, n in e["ratelimit"].items():
                w.sample("ratelimit_decisions_total", n, route=route, result=result)
    w.family("cache_requests_total", "counter", "Cache lookups, by route and result (hit, miss, stale).")
    for route, e in events:
        if any(e["cache"].values()):
            for result, n in e["cache"].items():
                w.sample("cache_requests_total", n, route=route, result=result)

    stats = [(service, target, segment.target_stats(slot)) for slot, service, target in targets]
    w.family("upstream_request_duration_seconds", "histogram",
             "Time from sending the request upstream to the end of its response (successful exchanges).")
    for service, target, s in stats:
        buckets, total, count = s["duration"]
        if count:
            w.histogram("upstream_request_duration_seconds", buckets, total, count, service=service, target=target)
    w.family("upstream_requests_total", "counter", "Upstream exchanges by result (failure: no response head, or cut short).")
    for service, target, s in stats:
        w.sample("upstream_requests_total", s["requests"] - s["failures"], service=service, target=target, result="ok")
        w.sample("upstream_requests_total", s["failures"], service=service, target=target, result="failure")
    w.family("upstream_active_requests", "gauge", "Requests in flight to the target.")
    for service, target, s in stats:
        w.sample("upstream_active_requests", s["active"], service=service, target=target)
    # The health word alone: a draining target is not unhealthy, and an alert on this gauge
    # should not fire on a routine drain.
    w.family("upstream_target_healthy", "gauge", "1 when the target passes its health checks, else 0.")
    for service, target, s in stats:
        w.sample("upstream_target_healthy", int(s["healthy"]), service=service, target=target)
    w.family("circuit_breaker_state", "gauge", "0 closed, 1 open, 2 half-open.")
    for service, target, s in stats:
        w.sample("circuit_breaker_state", ("closed", "open", "half_open").index(s["circuit"]),
                 service=service, target=target)

    w.family("open_connections", "gauge", "Client connections open now, by listener.")
    for slot, name in listeners:
        w.sample("open_connections", segment.listener_stats(slot)["open"], listener=name)
    w.family("connections_rejected_total", "counter", "Connections closed at once because max_connections was reached.")
    for slot, name in listeners:
        w.sample("connections_rejected_total", segment.listener_stats(slot)["rejected"], listener=name)

    w.family("config_reloads_total", "counter", "Config reloads and admin changes, by result.")
    for result in ("ok", "error"):
        w.sample("config_reloads_total", labels["reloads"][result], result=result)
    w.family("config_version", "gauge", "Version of the running config (1 at start, +1 per change).")
    w.sample("config_version", labels["config_version"])
    w.family("workers", "gauge", "Worker processes serving.")
    w.sample("workers", labels["workers"])
    w.family("build_info", "gauge", "Versions of fastgw and its core dependencies.")
    w.sample("build_info", 1, **labels["build"])
    return "\n".join(w.lines) + "\n"
