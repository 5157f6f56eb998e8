# The TLS server name read off a ClientHello (RFC 8446 §4.1.2, RFC 6066 §3): read once per
# connection, so everything in sni.pyx is Python-level (read_sni, sni_lookup) and nothing is
# cimported from it. This file declares that, so that every module of fastgw/_core has a .pxd
# (its C-level interface, empty here).
