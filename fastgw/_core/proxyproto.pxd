# The PROXY protocol (HAProxy's spec, versions 1 and 2): read and written once per connection, so
# everything in proxyproto.pyx is Python-level (parse_proxy_header, build_proxy_header,
# trusted_networks, peer_trusted) and nothing is cimported from it. This file declares that, so
# that every module of fastgw/_core has a .pxd (its C-level interface, empty here).
