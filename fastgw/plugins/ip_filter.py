"""ip_filter: allow or deny by client address (IPv4 and IPv6 CIDR).

The client address is the socket peer's. Only when the peer is one of `trusted_proxies` is a
PROXY protocol address or the X-Forwarded-For chain believed: the chain is read from the right,
past every trusted proxy, to the first address that is not one (what a spoofed left-most entry
cannot fake).
"""
from __future__ import annotations

import ipaddress

import msgspec

from fastgw.plugins.api import Plugin, Response

DECISIONS_KEPT = 65536


def _networks(cidrs: list[str]) -> tuple:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _address(text: str):
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class IpFilter(Plugin):
    name = "ip_filter"
    phase = "access"
    priority = 3000

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        allow: list[str] = []                      # empty: everyone not denied
        deny: list[str] = []                       # wins over allow
        trusted_proxies: list[str] = []

        def __post_init__(self):
            for cidr in self.allow + self.deny + self.trusted_proxies:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"{cidr!r} is not an IPv4 or IPv6 network (CIDR)") from None

    def __init__(self, config):
        super().__init__(config)
        self.allow, self.deny = _networks(config.allow), _networks(config.deny)
        self.trusted = _networks(config.trusted_proxies)
        self.decisions: dict[tuple, bool] = {}

    def _trusted(self, address) -> bool:
        return address is not None and any(address in net for net in self.trusted)

    def client_address(self, peer_ip: str, client_ip: str, forwarded_for: str | None):
        address = _address(peer_ip)
        if not self._trusted(address):
            return address
        if client_ip != peer_ip:                   # a PROXY header from a trusted balancer
            address = _address(client_ip)
        hops = [h for h in (forwarded_for or "").split(",") if h.strip()]
        while hops and self._trusted(address):
            address = _address(hops.pop())
        return address

    def allowed_for(self, peer_ip: str, client_ip: str, forwarded_for: str | None) -> bool:
        address = self.client_address(peer_ip, client_ip, forwarded_for)
        return address is not None and not any(address in net for net in self.deny) and \
            (not self.allow or any(address in net for net in self.allow))

    def native(self):
        from fastgw._core.native import IpFilterCheck

        return IpFilterCheck(self)

    @staticmethod
    def refuse():
        return Response.error(403, "forbidden", "your address may not use this route")

    def on_request(self, req):
        # Parsing addresses and walking networks takes microseconds; the same client comes back
        # again and again, so the answer is remembered per (peer, PROXY address, X-Forwarded-For).
        key = (req.peer_ip, req.client_ip, req.forwarded_for)
        allowed = self.decisions.get(key)
        if allowed is None:
            if len(self.decisions) >= DECISIONS_KEPT:
                self.decisions.clear()
            allowed = self.decisions[key] = self.allowed_for(*key)
        return None if allowed else self.refuse()
