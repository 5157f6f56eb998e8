# cython: language_level=3
"""The server name a TLS client asks for, read off its ClientHello without terminating TLS
(RFC 8446 §4.1.2, RFC 6066 §3), for listeners that pass TLS through by SNI.

Read once per connection, before any byte goes to a target.
"""
import struct

MAX_HELLO = 64 * 1024             # a ClientHello is a few hundred bytes to a few KiB (PQ key shares)


class SniError(ValueError):
    pass


def read_sni(bytes data):
    """(complete, server name or None) for the connection's first bytes. complete=False: the
    ClientHello is not all here yet. SniError: this is not a TLS ClientHello."""
    handshake = bytearray()
    offset = 0
    # The ClientHello may be split over several handshake records: join their fragments.
    while True:
        if len(data) - offset < 5:
            _check_prefix(data, offset)
            return False, None
        content_type, major, length = data[offset], data[offset + 1], struct.unpack_from(">H", data, offset + 3)[0]
        if content_type != 22 or major != 3 or length == 0 or length > 16384 + 2048:
            raise SniError("not a TLS handshake record")
        if len(data) - offset - 5 < length:
            return False, None
        handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise SniError("the first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if needed > MAX_HELLO:
                raise SniError("ClientHello too large")
            if len(handshake) >= needed:
                return True, _server_name(bytes(handshake[4:needed]))


def _check_prefix(bytes data, Py_ssize_t offset):
    if len(data) > offset and data[offset] != 22:
        raise SniError("not a TLS handshake record")


def _server_name(bytes hello):
    try:
        pos = 2 + 32                                   # legacy_version, random
        pos += 1 + hello[pos]                          # legacy_session_id
        pos += 2 + struct.unpack_from(">H", hello, pos)[0]      # cipher_suites
        pos += 1 + hello[pos]                          # legacy_compression_methods
        if pos == len(hello):
            return None                                # no extensions at all
        end = pos + 2 + struct.unpack_from(">H", hello, pos)[0]
        pos += 2
        while pos + 4 <= end:
            kind, size = struct.unpack_from(">HH", hello, pos)
            pos += 4
            if kind == 0:                              # server_name
                names_end = pos + 2 + struct.unpack_from(">H", hello, pos)[0]
                p = pos + 2
                while p + 3 <= names_end:
                    name_type, n = hello[p], struct.unpack_from(">H", hello, p + 1)[0]
                    if name_type == 0:                 # host_name
                        name = hello[p + 3:p + 3 + n].decode("ascii")
                        if not name or len(name) > 253:
                            raise SniError("bad server name")
                        return name.lower().rstrip(".")
                    p += 3 + n
                return None
            pos += size
        return None
    except (IndexError, struct.error, UnicodeDecodeError):
        raise SniError("malformed ClientHello") from None


def sni_lookup(dict exact, dict wildcard, name):
    """What a server name maps to: its exact entry, else the `*.parent` entry of its parent
    (a wildcard covers exactly one label, as in certificates), else None."""
    if name is None:
        return None
    found = exact.get(name)
    if found is None:
        found = wildcard.get(name.partition(".")[2])
    return found
