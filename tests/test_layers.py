"""The package layers (README.md, "Layers"; the contract is pyproject.toml's [tool.importlinter]):
each package imports only from the layers below it, with no function-local imports hiding a
dependency. `lint-imports` checks the Python modules; what it cannot see, the Cython modules and
where an import sits, is checked here."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from fastgw import api
from fastgw.plugins import api as old_api

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastgw"

# What the data plane's .pyx/.pxd may import of fastgw: itself and the layers below it.
CORE_MAY_IMPORT = ("fastgw._core", "fastgw.api", "fastgw.log", "fastgw.config")
_FASTGW_IMPORT = re.compile(r"^\s*(?:from\s+(fastgw[\w.]*)\s+c?import\b|c?import\s+(fastgw[\w.]*))", re.M)

# Imports that stay inside a function: (file, module or package imported) -> why.
LOCAL_IMPORTS_ALLOWED = {
    ("fastgw/config/validate.py", "opentelemetry"):
        "the otel extra is optional: importing it is the check that tracing can export",
    ("fastgw/server/tracing.py", "opentelemetry"):
        "the otel extra is optional: loaded only when tracing.otlp_endpoint is set",
    ("fastgw/server/health.py", "grpc"):
        "the grpc extra is optional: loaded only by gRPC health checks",
    ("fastgw/plugins/redis_store.py", "redis"):
        "the cluster extra is optional: loaded only with cluster.redis",
    ("fastgw/runtime/build.py", "fastgw.handlers.grpc"):
        "imports grpcio and protobuf (the grpc extra): loaded only for a route that has `grpc`",
    ("fastgw/handlers/grpc_route.py", "fastgw.handlers.grpc"):
        "imports grpcio and protobuf (the grpc extra): loaded once a route calls gRPC",
    ("fastgw/cli.py", "fastgw.runtime"):
        "needs the compiled core, which a source checkout may lack: `version` and `schema` must "
        "still run (`version` says `core: missing`)",
    ("fastgw/cli.py", "fastgw.server.supervisor"): "needs the compiled core (as fastgw.runtime)",
    ("fastgw/cli.py", "fastgw.admin.api"): "needs the compiled core (as fastgw.runtime)",
    ("fastgw/__init__.py", "fastgw.runtime.load"):
        "the package's root is imported before any of its modules, so it can reach the layer "
        "that loads a config (above everything below it) only when fastgw.load_config is called",
}


def test_import_linter_contract_is_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports}: install the test extra (pip install -e '.[test]')"
    # From the checkout's root, which lint-imports puts first on sys.path: this tree is analysed.
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout, result.stdout


def test_core_cython_modules_import_only_from_below():
    sources = sorted([*PACKAGE.joinpath("_core").glob("*.pyx"), *PACKAGE.joinpath("_core").glob("*.pxd")])
    assert sources
    wrong = []
    for source in sources:
        for m in _FASTGW_IMPORT.finditer(source.read_text()):
            module = m.group(1) or m.group(2)
            if not any(module == allowed or module.startswith(allowed + ".") for allowed in CORE_MAY_IMPORT):
                wrong.append(f"{source.relative_to(ROOT)}: {m.group(0).strip()}")
    assert wrong == []


def test_the_core_scan_sees_imports():
    """The scan above would pass on anything if its pattern matched nothing."""
    found = [m.group(1) or m.group(2) for m in _FASTGW_IMPORT.finditer(
        "from fastgw._core.buffer cimport WriteBuffer\nimport fastgw.server.log\n"
        "from fastgw.api import Headers\n")]
    assert found == ["fastgw._core.buffer", "fastgw.server.log", "fastgw.api"]


def _local_imports(tree: ast.AST):
    """(line, module) of every import inside a function body."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.Import):
                yield from ((child.lineno, alias.name) for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                yield child.lineno, "." * child.level + (child.module or "")
            yield from walk(child, inside)
    yield from walk(tree, False)


def test_no_function_local_imports_but_optional_dependencies():
    found, used = [], set()
    for source in sorted(PACKAGE.rglob("*.py")):
        name = source.relative_to(ROOT).as_posix()
        for line, module in _local_imports(ast.parse(source.read_text(), name)):
            allowed = [key for key in LOCAL_IMPORTS_ALLOWED
                       if key[0] == name and (module == key[1] or module.startswith(key[1] + "."))]
            if allowed:
                used.update(allowed)
            else:
                found.append(f"{name}:{line}: {module}")
    assert found == [], "import these at the top of the module (or name an optional dependency here)"
    assert used == set(LOCAL_IMPORTS_ALLOWED), "allowed but no longer there: remove from the list"


def test_the_local_import_scan_sees_them():
    tree = ast.parse("import os\n\ndef f():\n    import json\n    from fastgw.api import Plugin\n\n"
                     "class C:\n    async def g(self):\n        from . import x\n")
    assert list(_local_imports(tree)) == [(4, "json"), (5, "fastgw.api"), (9, ".")]


def test_plugins_written_against_the_old_module_still_import():
    for name in old_api.__all__:
        assert getattr(old_api, name) is getattr(api, name)
