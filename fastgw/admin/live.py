"""Live figures for the dashboard, read from shared memory in the supervisor: the one-per-second
snapshots of `GET /events` and the per-key usage of `GET /analytics`.

Snapshots: the cumulative counters (per route: requests by status, latency histogram, cache and
rate-limit events; per target: requests) are sampled once a second while someone listens; rates
and percentiles are the differences over the last WINDOW seconds. Percentiles are interpolated
inside the histogram's buckets, so they are estimates of the bucket resolution (0.5 ms ... 30 s).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

import msgspec

from fastgw import __version__
from fastgw._core.shm import BUCKETS, analytics_key
from fastgw.server.control_plane import ControlPlane
from fastgw.server.dns import dns_name

WINDOW = 10                      # seconds that rates and percentiles cover
MAX_ANALYTICS_MINUTES = 60
# Answer counts the dashboard shows per route: the 4xx an operator tells apart (no credentials,
# refused, rate-limited), the other 4xx, and 5xx. Labels as in shared memory (fastgw/_core/shm.pyx).
SPLIT_4XX = ("401", "403", "429")
ANSWER_CLASSES = (*SPLIT_4XX, "4xx", "5xx")


def percentile(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms of a BUCKETS histogram (the last bucket is +Inf)."""
    total = sum(hist)
    if not total:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for count, upper in zip(hist, [*BUCKETS, BUCKETS[-1] * 2]):
        if count and seen + count >= rank:
            return round((lower + (upper - lower) * (rank - seen) / count) * 1000, 3)
        seen += count
        lower = upper
    return round(BUCKETS[-1] * 1000, 3)


def target_health(target, stats: dict | None, dns_state: str | None = None) -> dict:
    """A target's row of GET /services/{name}/health (and of the snapshots): its config entry and
    its shared-memory stats (None: not tracked). A target resolved from a DNS name also has its
    `name` and `dns` state (resolved, stale or unresolved: then no address and not healthy)."""
    named = {} if dns_state is None else {"name": dns_name(target), "dns": dns_state}
    return {
        "address": target.address,
        **named,
        "healthy": (stats["healthy"] if stats else True) and target.address is not None,
        "ejected": stats["ejected"] if stats else False,
        "circuit": stats["circuit"] if stats else "closed",
        "active": stats["active"] if stats else 0,
        "ewma_ms": round(stats["ewma_ms"], 3) if stats else None,
        "weight": target.weight,
        "draining": target.drain,
    }


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def answer_counts(cells) -> dict:
    """{401, 403, 429, 4xx (the other 4xx), 5xx: requests} of a route's (method, code, n) cells."""
    counts = dict.fromkeys(ANSWER_CLASSES, 0)
    for _, code, n in cells:
        if code in SPLIT_4XX:
            counts[code] += n
        elif code[0] in "45":
            counts[code[0] + "xx"] += n
    return counts


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


class LiveStats:
    def __init__(self, sup: ControlPlane):
        self.sup = sup
        self.samples: deque = deque(maxlen=WINDOW + 1)
        self.listeners = 0
        self.fresh = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- sampling --------------------------------------------------------------------------------

    def _sample(self) -> dict:
        seg, slots, config = self.sup.segment, self.sup.current_slots, self.sup.store.loaded.config
        routes = {}
        for route in config.routes:
            slot = slots["routes"].get(route.name, -1)
            if slot < 0:
                continue
            cells = seg.route_requests(slot)
            hist, _, _ = seg.route_duration(slot)
            routes[route.name] = {
                "service": route.service or "",
                "requests": sum(n for _, _, n in cells),
                "errors": sum(n for _, code, n in cells if code.startswith("5")),
                "answers": answer_counts(cells),
                "hist": hist, "events": seg.route_events(slot)}
        cells = seg.route_requests(0)
        unmatched = {"requests": sum(n for _, _, n in cells), "answers": answer_counts(cells),
                     "hist": seg.route_duration(0)[0]}
        targets = {key: seg.target_stats(slot) for key, slot in slots["targets"].items() if slot >= 0}
        return {"t": time.monotonic(), "routes": routes, "targets": targets, "unmatched": unmatched}

    async def _run(self) -> None:
        while self.listeners:
            self.samples.append(self._sample())
            self.fresh.set()
            self.fresh = asyncio.Event()
            await asyncio.sleep(1.0)
        self._task = None

    async def events(self):
        """The SSE stream: a snapshot now and then one per second, for as long as the client reads."""
        self.listeners += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            while True:
                await self.fresh.wait()
                yield b"data: " + msgspec.json.encode(self.snapshot()) + b"\n\n"
        finally:
            self.listeners -= 1

    # --- one snapshot ----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        old, new = self.samples[0], self.samples[-1]
        dt = max(new["t"] - old["t"], 1e-9) if len(self.samples) > 1 else None
        rate = (lambda n: round(n / dt, 2)) if dt else (lambda n: 0.0)
        sup = self.sup
        status = sup.status()
        routes = []
        # Totals start with the requests that matched no route (404s), counted in slot 0.
        unmatched_now, unmatched_before = new["unmatched"], old["unmatched"]
        unmatched_requests = unmatched_now["requests"] - unmatched_before["requests"]
        unmatched_5xx = unmatched_now["answers"]["5xx"] - unmatched_before["answers"]["5xx"]
        unmatched_hist = [a - b for a, b in zip(unmatched_now["hist"], unmatched_before["hist"])]
        all_requests, all_hist, all_answers = unmatched_requests, unmatched_hist, unmatched_now["answers"]
        all_errors = hits = misses = 0
        for name, now in new["routes"].items():
            before = old["routes"].get(name, now)
            requests = now["requests"] - before["requests"]
            errors = now["errors"] - before["errors"]
            hist = [a - b for a, b in zip(now["hist"], before["hist"])]
            cache = {k: now["events"]["cache"][k] - before["events"]["cache"][k] for k in ("hit", "miss", "stale")}
            limited = now["events"]["ratelimit"]["rejected"] - before["events"]["ratelimit"]["rejected"]
            all_requests, all_errors = all_requests + requests, all_errors + errors
            all_answers = _add(all_answers, now["answers"])
            all_hist = [a + b for a, b in zip(all_hist, hist)]
            hits, misses = hits + cache["hit"] + cache["stale"], misses + cache["miss"]
            routes.append({
                "name": name, "service": now["service"], "requests": now["requests"],
                "answers": now["answers"], "rps": rate(requests), "error_rate": _ratio(errors, requests) or 0.0,
                "p50_ms": percentile(hist, 0.5), "p95_ms": percentile(hist, 0.95),
                "p99_ms": percentile(hist, 0.99), "rate_limited": rate(limited),
                "cache_hit_ratio": _ratio(cache["hit"] + cache["stale"], sum(cache.values()))})
        return {
            "ts": round(time.time(), 3),
            "version": __version__,
            "uptime_s": status["uptime_s"],
            "config_version": status["config_version"],
            "workers": status["workers"],
            "listeners": self._listeners(),
            # Cumulative counts (requests, answers) since the start: the rows add up to the totals.
            "totals": {"rps": rate(all_requests), "error_rate": _ratio(all_errors, all_requests) or 0.0,
                       "p50_ms": percentile(all_hist, 0.5), "p95_ms": percentile(all_hist, 0.95),
                       "p99_ms": percentile(all_hist, 0.99),
                       "requests": sum(r["requests"] for r in new["routes"].values()) + unmatched_now["requests"],
                       "answers": all_answers},
            "unmatched": {"requests": unmatched_now["requests"], "answers": unmatched_now["answers"],
                          "rps": rate(unmatched_requests),
                          "error_rate": _ratio(unmatched_5xx, unmatched_requests) or 0.0,
                          "p50_ms": percentile(unmatched_hist, 0.5), "p95_ms": percentile(unmatched_hist, 0.95),
                          "p99_ms": percentile(unmatched_hist, 0.99)},
            "routes": routes,
            "services": self._services(old, new, rate),
            "cache": {"hit_ratio": _ratio(hits, hits + misses), "hits_per_s": rate(hits),
                      "misses_per_s": rate(misses)},
            "reload": status["reload"],
        }

    def _listeners(self) -> list[dict]:
        seg, slots = self.sup.segment, self.sup.current_slots["listeners"]
        return [{"name": spec.name, "bind": spec.bind, "protocol": spec.protocol,
                 **seg.listener_stats(slots[spec.name])}
                for spec in self.sup.store.loaded.config.listeners if slots.get(spec.name, -1) >= 0]

    def _services(self, old: dict, new: dict, rate) -> list[dict]:
        config = self.sup.running                 # named targets: one row per resolved address
        services = []
        for name, spec in config.services.items():
            rows, traffic = [], {}
            for t in spec.targets:
                now = new["targets"].get((name, t.address))
                before = old["targets"].get((name, t.address), now)
                traffic[t.address] = now["requests"] - before["requests"] if now else 0
                rows.append({**target_health(t, now, self.sup.dns_state(t)), "rps": rate(traffic[t.address])})
            total = sum(traffic.values())
            for row in rows:
                row["share"] = _ratio(traffic[row["address"]], total)
            services.append({"name": name, "targets": rows})
        return services


def history(sup: ControlPlane, minutes: int) -> dict:
    """All traffic (every route's and the unmatched requests) per minute over the last `minutes`,
    oldest first, the current minute last: what the dashboard's charts start from. A minute's
    `seconds` are those it covers (60, but less for the current minute and for the one the gateway
    started in), so requests / seconds is its rate."""
    config = sup.store.loaded.config
    keys = [analytics_key("route", r.name) for r in config.routes] + [analytics_key("route", "")]
    now, mono = time.time(), time.monotonic()
    current_start = now - mono % 60               # the segment's minutes are monotonic minutes
    started = sup.started
    rows = []
    for age, (requests, errors, hist) in zip(range(minutes - 1, -1, -1), sup.segment.analytics_minutes(keys, minutes)):
        start = current_start - 60 * age
        end = min(start + 60, now)
        seconds = round(max(end - max(start, started), 1.0), 3)
        rows.append({"ts": round(start, 3), "seconds": seconds, "requests": requests, "errors": errors,
                     "error_rate": _ratio(errors, requests), "p50_ms": percentile(hist, 0.5),
                     "p95_ms": percentile(hist, 0.95), "p99_ms": percentile(hist, 0.99)})
    return {"ts": round(now, 3), "window_s": minutes * 60, "minutes": rows}


def analytics(sup: ControlPlane, by: str, minutes: int) -> dict:
    """Requests, 5xx errors and latency percentiles per route, service or consumer over the last
    `minutes` (one-minute resolution, the current minute included)."""
    config = sup.store.loaded.config
    names = {"route": [r.name for r in config.routes], "service": list(config.services),
             "consumer": [c.name for c in config.consumers] + ["-"]}[by]
    found = sup.segment.analytics([(analytics_key(by, n), n) for n in names], minutes)
    rows = [{"key": key, "requests": requests, "errors": errors,
             "error_rate": _ratio(errors, requests), "p50_ms": percentile(hist, 0.5),
             "p95_ms": percentile(hist, 0.95), "p99_ms": percentile(hist, 0.99)}
            for key, (requests, errors, hist) in found.items()]
    rows.sort(key=lambda r: -r["requests"])
    return {"by": by, "window_s": minutes * 60, "rows": rows}
