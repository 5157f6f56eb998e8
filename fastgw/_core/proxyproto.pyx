# cython: language_level=3
"""The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a load balancer in front of
us puts before a connection's first byte to say who the client is, and the one we put before
ours when a target wants to know.

Read once per connection, so plain Python speed is enough here.
"""
import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107                      # the whole v1 line, CRLF included
V2_MAX = 16 + 536                 # a v2 header with the largest address block we accept
_V2_FAMILIES = {0x11: (4, 12), 0x12: (4, 12), 0x21: (6, 36), 0x22: (6, 36)}   # TCP4 UDP4 TCP6 UDP6


class ProxyHeaderError(ValueError):
    pass


def parse_proxy_header(bytes data):
    """Read a PROXY header at the start of `data`: (bytes it takes, (client ip, port) or None).
    None for LOCAL / UNKNOWN (the balancer's own connection: use the real peer); (0, None) while
    the header is still incomplete. ProxyHeaderError when `data` does not start with one."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    if not data:
        return 0, None
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _parse_v1(bytes data):
    # The spec's section 2.1: "PROXY", the family, two addresses and two ports, each after exactly
    # one space, then CRLF, 107 bytes at most. Addresses are read strictly: only the characters
    # of an address (no IPv6 zone id, which Python's ipaddress would take with anything in it).
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or not (data.startswith(b"PROXY ") or b"PROXY ".startswith(data)):
            raise ProxyHeaderError("PROXY v1 line too long or malformed")
        return 0, None
    parts = data[:end].split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == b"UNKNOWN":                     # the rest of the line is to be ignored
        return end + 2, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 line")
    version = 4 if parts[1] == b"TCP4" else 6
    source, dest = _v1_address(parts[2], version), _v1_address(parts[3], version)
    _v1_port(parts[4])
    _v1_port(parts[5])
    if source is None or dest is None:
        raise ProxyHeaderError("bad address in PROXY v1 line")
    return end + 2, (str(source), int(parts[4]))


def _v1_address(bytes raw, int version):
    """The address of the given family, or None."""
    if not raw or raw.strip(b"0123456789abcdefABCDEF:." if version == 6 else b"0123456789."):
        return None
    try:
        address = ipaddress.ip_address(raw.decode("ascii"))
    except ValueError:
        return None
    return address if address.version == version else None


def _v1_port(bytes raw):
    """1 to 5 ASCII digits, no sign or leading zero, at most 65535."""
    if not 0 < len(raw) <= 5 or raw.strip(b"0123456789") or (raw[0] == 48 and len(raw) > 1) or \
            int(raw) > 65535:
        raise ProxyHeaderError("bad port in PROXY v1 line")


def _parse_v2(bytes data):
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyHeaderError("bad PROXY v2 signature")
        return 0, None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad PROXY v2 signature")
    version_command, family = data[12], data[13]
    length = struct.unpack_from(">H", data, 14)[0]
    if version_command >> 4 != 2 or (version_command & 0x0F) > 1:
        raise ProxyHeaderError("unknown PROXY v2 version or command")
    if 16 + length > V2_MAX:
        raise ProxyHeaderError("PROXY v2 header too long")
    if len(data) < 16 + length:
        return 0, None
    if version_command & 0x0F == 0:                # LOCAL
        return 16 + length, None
    known = _V2_FAMILIES.get(family)
    if known is None:                              # UNSPEC or a unix socket: no client address
        return 16 + length, None
    ip_version, needed = known
    if length < needed:
        raise ProxyHeaderError("PROXY v2 address block too short")
    size = 4 if ip_version == 4 else 16
    source = ipaddress.ip_address(data[16:16 + size])
    port = struct.unpack_from(">H", data, 16 + 2 * size)[0]
    return 16 + length, (str(source), port)


def trusted_networks(cidrs):
    """The networks whose peers may send a PROXY header; None (any peer) for None."""
    if cidrs is None:
        return None
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def peer_trusted(networks, peer):
    """May the socket peer `peer` (its address text, bytes or str) send a PROXY header?"""
    if networks is None:
        return True
    if isinstance(peer, bytes):
        peer = peer.decode("ascii", "replace")
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:                            # a unix socket: no address to trust
        return False
    if address.version == 6 and address.ipv4_mapped is not None:   # a dual-stack socket's IPv4 peer
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def build_proxy_header(int version, source, dest):
    """The header that tells a target about the client: `source` and `dest` are (ip, port, ...)
    as transports report them (dest: the address the client connected to)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
    if src.version != dst.version:               # one side IPv4, the other IPv6: say both in v6
        src, dst = _as_v6(src), _as_v6(dst)
    if version == 1:
        return f"PROXY TCP{src.version} {src} {dst} {source[1]} {dest[1]}\r\n".encode("ascii")
    block = src.packed + dst.packed + struct.pack(">HH", source[1], dest[1])
    return V2_SIGNATURE + bytes([0x21, 0x11 if src.version == 4 else 0x21]) + \
        struct.pack(">H", len(block)) + block


def _as_v6(address):
    return address if address.version == 6 else ipaddress.IPv6Address(f"::ffff:{address}")
