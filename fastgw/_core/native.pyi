# The Python-visible part of the native plugin checks (fastgw/_core/native.pyx): plugins build
# them (fastgw/plugins/key_auth.py, ip_filter.py, acl.py); the data plane calls their C-level
# `run` (native.pxd).
from typing import Any

class NativeCheck: ...

class KeyAuthCheck(NativeCheck):
    def __init__(self, plugin: Any, header: str) -> None: ...

class IpFilterCheck(NativeCheck):
    def __init__(self, plugin: Any) -> None: ...

class AclCheck(NativeCheck):
    def __init__(self, plugin: Any) -> None: ...
