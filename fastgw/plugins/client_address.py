"""Who the client is: the socket peer, unless the peer is a trusted proxy.

Only when the peer is one of the trusted networks is a PROXY protocol address or the
X-Forwarded-For chain believed: the chain is read from the right, past every trusted proxy, to the
first address that is not one (what a spoofed left-most entry cannot fake). `ip_filter` decides
with this rule, and `rate_limit` keys `ip` (and `consumer` without one) by it.
"""
from __future__ import annotations

import ipaddress

DECISIONS_KEPT = 65536


def networks(cidrs: list[str]) -> tuple:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def parse_address(text: str):
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_cidrs(cidrs: list[str]) -> None:
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IPv4 or IPv6 network (CIDR)") from None


class TrustedProxies:
    def __init__(self, cidrs: list[str]) -> None:
        self.networks = networks(cidrs)
        self.keys: dict[tuple, bytes] = {}

    def trusts(self, address) -> bool:
        return address is not None and any(address in net for net in self.networks)

    def trusts_peer(self, peer_ip: bytes) -> bool:
        return self.trusts(parse_address(peer_ip.decode("latin-1")))

    def client_address(self, peer_ip: str, client_ip: str, forwarded_for: str | None):
        address = parse_address(peer_ip)
        if not self.trusts(address):
            return address
        if client_ip != peer_ip:                   # a PROXY header from a trusted balancer
            address = parse_address(client_ip)
        hops = [h for h in (forwarded_for or "").split(",") if h.strip()]
        while hops and self.trusts(address):
            address = parse_address(hops.pop())
        return address

    def client_key(self, peer_ip: bytes, client_ip: bytes, forwarded_for: bytes | None) -> bytes:
        """The client address as the data plane's rate-limit key (remembered: the same clients
        come back again and again)."""
        key = (peer_ip, client_ip, forwarded_for)
        found = self.keys.get(key)
        if found is None:
            if len(self.keys) >= DECISIONS_KEPT:
                self.keys.clear()
            address = self.client_address(peer_ip.decode("latin-1"), client_ip.decode("latin-1"),
                                          forwarded_for.decode("latin-1") if forwarded_for is not None else None)
            found = self.keys[key] = str(address).encode() if address is not None else peer_ip
        return found
