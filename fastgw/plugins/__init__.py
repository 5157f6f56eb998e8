"""Plugins: the API (api.py), finding and chaining them (registry.py, chain.py), and the built-ins,
one module each."""
