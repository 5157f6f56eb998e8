"""fastgw: an API gateway and load balancer with a Cython data plane on uvloop and httptools."""
__version__ = "0.1.0"

__all__ = ["__version__", "Plugin", "Request", "Response", "load_config"]

from fastgw.api import Plugin, Request, Response  # noqa: E402


def load_config(path=None):
    """Load, validate and return the configuration at `path` (the embedded default if None)."""
    # The package's root is imported before any of its modules, so it can only reach the layer
    # that loads a config (fastgw/runtime/load.py, above everything it imports) when called.
    from fastgw.runtime.load import load_config as _load

    return _load(path)
