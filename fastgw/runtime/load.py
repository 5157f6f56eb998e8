"""Loading a config with every check: the config package's own (fastgw/config/load.py) and the
ones only this layer can make, because they need the plugin registry and the compiler."""
from __future__ import annotations

from fastgw.config import load as _config
from fastgw.config.errors import CompileError, ConfigProblem
from fastgw.config.load import LoadedConfig
from fastgw.config.model import Config
from fastgw.plugins.registry import PythonPluginConfig, load_class, plugin_class, plugin_problems
from fastgw.runtime.build import compile_config, shadowed_routes


class RuntimeChecks:
    """fastgw.config.load.Checks, answered by the plugin registry and the compiler."""

    def plugin_config(self, name: str) -> type:
        return PythonPluginConfig if name == "python" else plugin_class(name).Config

    def python_plugin_config(self, module: str) -> type:
        return load_class(module).Config

    def plugin_problems(self, config: Config) -> list[ConfigProblem]:
        return [ConfigProblem(path, message) for path, message in plugin_problems(config)]

    def build_problems(self, config: Config) -> list[ConfigProblem]:
        try:
            runtime = compile_config(config)
        except CompileError as e:
            return [ConfigProblem(p, m) for p, m in e.problems]
        try:
            return [ConfigProblem(p, m, severity="warning") for p, m in shadowed_routes(runtime)]
        finally:
            runtime.close()


CHECKS = RuntimeChecks()


def load_config(path: str | None = None) -> LoadedConfig:
    """Load and validate a config; raise ConfigError listing every problem found."""
    return _config.load_config(path, checks=CHECKS)


def load_text(text: str, name: str, fmt: str, path: str | None = None) -> LoadedConfig:
    """Load a config from its text; problems are reported against `name`."""
    return _config.load_text(text, name, fmt, path, checks=CHECKS)
