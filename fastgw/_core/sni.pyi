# The server name of a TLS ClientHello (fastgw/_core/sni.pyx; RFC 6066 §3), read by the TCP
# listener (fastgw/_core/tcp.pyx) to route a connection without terminating TLS.
from typing import TypeVar

_T = TypeVar("_T")

MAX_HELLO: int

class SniError(ValueError): ...

def read_sni(data: bytes) -> tuple[bool, str | None]: ...
def sni_lookup(exact: dict[str, _T], wildcard: dict[str, _T], name: str | None) -> _T | None: ...
