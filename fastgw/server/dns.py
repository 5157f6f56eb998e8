"""Targets named by DNS, resolved in the supervisor (one resolver for every worker, never on the
request path).

A target `address: name:port` (type A) or `dns: {name, port, type: A|AAAA|SRV, refresh}` stands
for one target per address the name resolves to, each with the configured target's weight (per
address, as Kong does). Names are looked up like glibc's "files dns": the hosts file first, then
the resolvers of `dns.resolvers` (default: /etc/resolv.conf). Each name is re-resolved at its TTL
bounded to [min_ttl, max_ttl] (or every `refresh`); a failed re-resolution keeps the last good
addresses (stale) for up to `stale_ttl`, after which the name is unresolved.

`expand(config)` gives the config the workers run: the same config with every named target
replaced by its addresses (each keeps its `dns` spec, which names it for TLS), or, while the
name resolves to nothing, by one placeholder with `address: None` that the compiler turns into
"this service has an unresolved target" (503, access-log flag DF).
"""
from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import msgspec

from fastgw.config.model import Config, Dns, Target, TargetDns
from fastgw.config.validate import parse_bind, parse_resolver
from fastgw.log import log

HOSTS_FILE = "/etc/hosts"


@dataclass(frozen=True)
class Query:
    name: str                  # lower case, no trailing dot
    type: str                  # A, AAAA or SRV
    port: int | None           # None for SRV: each record has its own
    refresh: float | None      # fixed re-resolution interval, or None: the TTL


@dataclass
class Answer:
    addresses: tuple[tuple[str, int], ...]   # (ip, port), sorted
    state: str                 # resolved | stale | unresolved
    due: float                 # monotonic time of the next resolution
    good_at: float | None = None             # monotonic time of the last successful resolution
    error: str | None = None


class LookupFailed(Exception):
    pass


def query_of(target: Target) -> Query | None:
    """What resolves `target`, or None for an IP literal (not a DNS target)."""
    if target.dns is not None:
        spec = target.dns
        return Query(spec.name.lower().rstrip("."), spec.type, spec.port, spec.refresh)
    host, port = parse_bind(target.address)
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return Query(host.lower().rstrip("."), "A", port, None)


def join_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def dns_name(target: Target) -> str:
    """The name a resolved (or unresolved) target stands for: `name:port`, or `name` for SRV."""
    return target.dns.name if target.dns.port is None else f"{target.dns.name}:{target.dns.port}"


def names_in(config: Config) -> set[Query]:
    return {q for svc in config.services.values() for t in svc.targets if (q := query_of(t))}


def hosts_file_addresses(name: str, family: str, path: str = HOSTS_FILE) -> list[str]:
    """The addresses of `name` in the hosts file (hosts(5)), of one family: A (IPv4) or AAAA."""
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or name not in (n.lower().rstrip(".") for n in fields[1:]):
            continue
        try:
            ip = ipaddress.ip_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        if (ip.version == 4) == (family == "A") and str(ip) not in found:
            found.append(str(ip))
    return found


class Resolver:
    def __init__(self, spec: Dns):
        self.spec = spec
        self.answers: dict[Query, Answer] = {}
        self.resolver = _dns_resolver(spec)

    def configure(self, spec: Dns) -> None:
        """A reload may change the `dns` section (other resolvers, other bounds): every name is
        then resolved afresh."""
        if spec != self.spec:
            self.spec, self.resolver, self.answers = spec, _dns_resolver(spec), {}

    def state(self, target: Target) -> str | None:
        """resolved, stale or unresolved for a named target; None for an IP literal."""
        query = query_of(target)
        if query is None:
            return None
        answer = self.answers.get(query)
        return answer.state if answer is not None else "unresolved"

    async def resolve_new(self, config: Config) -> None:
        """Resolve the names of `config` that have no answer yet (at start and before a change is
        applied)."""
        await asyncio.gather(*(self._refresh(q) for q in names_in(config) if q not in self.answers))

    def forget_others(self, config: Config) -> None:
        """Stop re-resolving names the running `config` no longer has."""
        for query in set(self.answers) - names_in(config):
            del self.answers[query]

    def next_due(self) -> float | None:
        return min((a.due for a in self.answers.values()), default=None)

    async def refresh_due(self) -> None:
        """Re-resolve the names whose time has come."""
        now = time.monotonic()
        due = [q for q, a in self.answers.items() if a.due <= now]
        await asyncio.gather(*(self._refresh(q) for q in due))

    async def _refresh(self, query: Query) -> None:
        before = self.answers.get(query)
        now = time.monotonic()
        try:
            addresses, ttl = await self._lookup(query)
        except LookupFailed as exc:
            retry = now + self.spec.min_ttl
            stale = before is not None and before.addresses and before.good_at is not None and \
                now - before.good_at < self.spec.stale_ttl
            if stale:
                answer = Answer(before.addresses, "stale", retry, before.good_at, str(exc))
                log(f"dns: {query.name} ({query.type}) failed to resolve ({exc}); keeping its last "
                    f"addresses {_listing(before.addresses)}", "warning")
            else:
                answer = Answer((), "unresolved", retry, None, str(exc))
                if before is None or before.state != "unresolved":
                    log(f"dns: {query.name} ({query.type}) does not resolve: {exc}", "warning")
        else:
            interval = query.refresh or min(self.spec.max_ttl, max(self.spec.min_ttl, ttl))
            answer = Answer(addresses, "resolved", now + interval, now)
            if before is None or before.addresses != addresses:
                log(f"dns: {query.name} ({query.type}) -> {_listing(addresses)} "
                    f"(next in {interval:g}s)", "info")
        self.answers[query] = answer

    async def _lookup(self, query: Query) -> tuple[tuple[tuple[str, int], ...], float]:
        """(sorted (ip, port) pairs, TTL in seconds) or LookupFailed."""
        if query.type == "SRV":
            records = await self._records(query.name, "SRV")
            ttl, rdatas = records
            usable = [r for r in rdatas if str(r.target) != "."]   # "." = no service (RFC 2782)
            if not usable:
                raise LookupFailed("no SRV record names a target")
            # Only the lowest priority value is used; higher values are fallbacks (RFC 2782).
            best = min(r.priority for r in usable)
            found, ttls = set(), [ttl]
            for record in (r for r in usable if r.priority == best):
                ips, ip_ttl = await self._addresses(str(record.target).rstrip(".").lower(), "A")
                ttls.append(ip_ttl)
                found.update((ip, record.port) for ip in ips)
            return tuple(sorted(found)), min(ttls)
        ips, ttl = await self._addresses(query.name, query.type)
        return tuple(sorted((ip, query.port) for ip in ips)), ttl

    async def _addresses(self, name: str, family: str) -> tuple[list[str], float]:
        local = hosts_file_addresses(name, family)
        if local:                         # the hosts file has no TTL: read again every min_ttl
            return local, self.spec.min_ttl
        ttl, rdatas = await self._records(name, family)
        return [r.address for r in rdatas], ttl

    async def _records(self, name: str, rdtype: str) -> tuple[float, list]:
        if self.resolver is None:
            raise LookupFailed("no resolver: set dns.resolvers (none in /etc/resolv.conf)")
        try:
            answer = await self.resolver.resolve(name, rdtype, lifetime=self.spec.timeout)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed("no such name (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise LookupFailed(f"no {rdtype} record") from None
        except dns.exception.Timeout:
            raise LookupFailed(f"no answer within {self.spec.timeout:g}s") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(str(exc) or type(exc).__name__) from None
        return float(answer.rrset.ttl), list(answer)

    def expand(self, config: Config) -> Config:
        """`config` with every named target replaced by its resolved addresses (see the module)."""
        services = {}
        for name, service in config.services.items():
            taken = {t.address for t in service.targets if query_of(t) is None}
            targets = []
            for target in service.targets:
                query = query_of(target)
                if query is None:
                    targets.append(target)
                    continue
                spec = target.dns or TargetDns(name=query.name, port=query.port)
                answer = self.answers.get(query)
                addresses = [join_address(ip, port) for ip, port in answer.addresses] if answer else []
                fresh = [a for a in addresses if a not in taken]
                taken.update(fresh)
                if not addresses:
                    targets.append(msgspec.structs.replace(target, address=None, dns=spec))
                targets.extend(msgspec.structs.replace(target, address=a, dns=spec) for a in fresh)
            services[name] = msgspec.structs.replace(service, targets=targets) \
                if targets != service.targets else service
        return msgspec.structs.replace(config, services=services)


def _dns_resolver(spec: Dns):
    """dnspython's resolver on `spec.resolvers`, or on /etc/resolv.conf (None if it has none)."""
    if spec.resolvers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_resolver(r)) for r in spec.resolvers]
        return resolver
    try:
        return dns.asyncresolver.Resolver()
    except dns.resolver.NoResolverConfiguration:
        return None


def _listing(addresses) -> str:
    return ", ".join(join_address(ip, port) for ip, port in addresses) or "nothing"


async def unresolvable(config: Config) -> list[tuple[str, str]]:
    """(key path, why) of each named target that does not resolve now (for `fastgw check`)."""
    resolver = Resolver(config.dns)
    named = [(f"services.{name}.targets[{i}].{'dns.name' if t.dns is not None else 'address'}", query)
             for name, service in config.services.items()
             for i, t in enumerate(service.targets) if (query := query_of(t)) is not None]

    async def why_not(query: Query) -> str | None:
        try:
            addresses, _ = await resolver._lookup(query)
        except LookupFailed as exc:
            return str(exc)
        return None if addresses else "no address"

    found = await asyncio.gather(*(why_not(query) for _, query in named))
    return [(path, f"{query.name} ({query.type}) does not resolve ({why}): the target is unresolved "
                   f"until it does") for (path, query), why in zip(named, found) if why is not None]
