"""fastgw: an API gateway and load balancer with a Cython data plane on uvloop and httptools."""
__version__ = "0.1.0"

__all__ = ["__version__", "Plugin", "Request", "Response", "load_config"]

from fastgw.api import Plugin, Request, Response  # noqa: E402


def load_config(path=None):
    """Load, validate and return the configuration at `path` (the embedded default if None)."""
    from fastgw.config.load import load_config as _load

    return _load(path)
