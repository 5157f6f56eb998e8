"""The Cython data plane. Every module listed here must be a compiled extension."""
MODULES = ("buffer", "router", "upstream", "protocol")
