"""The plugin API's old home, kept so that plugins written against `fastgw.plugins.api` still
import: the types live in `fastgw.api` (README.md, "Plugins")."""
from fastgw.api import (PHASES, Headers, Plugin, PluginContext, Request, Response, accept_token,
                        token_consumers)

__all__ = ["PHASES", "Headers", "Plugin", "PluginContext", "Request", "Response", "accept_token",
           "token_consumers"]
