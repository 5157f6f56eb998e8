"""Plugins: finding and chaining them (registry.py, chain.py), and the built-ins, one module each.
The API they are written against is fastgw/api.py (api.py here re-exports it)."""
