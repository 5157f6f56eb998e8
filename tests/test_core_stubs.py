"""The `.pyi` stubs of the compiled modules (fastgw/_core/*.pyi) say what Python may use of them.

A stub that drifts from its module misleads every reader and type checker, so each one is held
to its compiled module: every public name of the module is in the stub, every name in the stub
exists in the module, a class lists exactly the public members its own type defines, and a
function or method takes the same parameters (names, kinds, which have defaults). And every
`_core` module that Python code imports ships a stub.
"""
import ast
import importlib
import inspect
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "fastgw" / "_core"
PYTHON_DIRS = ("fastgw", "tests", "benchmarks", "tools")

STUB_LATER: set[str] = set()     # modules whose stub is still to be written (none now)

COMPILED = sorted(p.stem for p in CORE.glob("*.pyx"))
STUBS = sorted(p.stem for p in CORE.glob("*.pyi"))


def _core_modules_imported_by_python():
    """{module: first file} for every `fastgw._core.X` a .py file imports, however spelled."""
    found = {}
    for top in PYTHON_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package[:len(package) - node.level + 1]
                        base = ".".join(parts + ([node.module] if node.module else []))
                    names = [base] + [f"{base}.{a.name}" for a in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[:2] == ["fastgw", "_core"] and len(parts) > 2 and parts[2] in COMPILED:
                        found.setdefault(parts[2], path.relative_to(ROOT))
    return found


def _stub_names(body):
    """Names a stub body declares: functions, classes, annotated names, and `import x as x`
    re-exports. Plain assignments are stub-only helpers (type aliases, TypeVars) and are left out;
    they must be private."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.setdefault(node.name, node)      # a property's setter repeats its name
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.ImportFrom):
            names.update((a.asname, node) for a in node.names if a.asname == a.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                assert isinstance(target, ast.Name) and target.id.startswith("_"), \
                    f"stub-only name {ast.unparse(target)} must be private"
    return names


def _public_names(module):
    """What the module itself defines for Python: no private names, no imported modules and no
    classes or functions it imported from elsewhere."""
    names = set()
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if isinstance(value, type) or callable(value):
            if getattr(value, "__module__", None) != module.__name__:
                continue
        names.add(name)
    return names


def _parameters(arguments):
    """(name, kind, has a default) of each parameter in a stub's ast.arguments."""
    P = inspect.Parameter
    out = [(a.arg, P.POSITIONAL_ONLY, False) for a in arguments.posonlyargs]
    defaults = [False] * (len(arguments.args) - len(arguments.defaults)) + [True] * len(arguments.defaults)
    out += [(a.arg, P.POSITIONAL_OR_KEYWORD, d) for a, d in zip(arguments.args, defaults)]
    if arguments.vararg:
        out.append((arguments.vararg.arg, P.VAR_POSITIONAL, False))
    out += [(a.arg, P.KEYWORD_ONLY, d is not None) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg:
        out.append((arguments.kwarg.arg, P.VAR_KEYWORD, False))
    return out


def _check_signature(function, node):
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):                # a slot wrapper (__init__ of a cdef class)
        return
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()) and "self" in signature.parameters:
        return                                     # (self, /, *args, **kwargs): nothing to compare
    actual = [(p.name, p.kind, p.default is not p.empty) for p in signature.parameters.values()]
    declared = _parameters(node.args)
    assert declared == actual, f"{node.name}: stub {declared} != module {actual}"


@pytest.mark.parametrize("name", sorted(set(_core_modules_imported_by_python()) - STUB_LATER))
def test_every_core_module_python_imports_has_a_stub(name):
    assert name in STUBS, f"fastgw/_core/{name}.pyi missing ({_core_modules_imported_by_python()[name]} imports it)"


def test_every_stub_belongs_to_a_compiled_module():
    assert set(STUBS) <= set(COMPILED)


@pytest.mark.parametrize("name", STUBS)
def test_stub_lists_what_python_can_use(name):
    module = importlib.import_module(f"fastgw._core.{name}")
    stub = _stub_names(ast.parse((CORE / f"{name}.pyi").read_text()).body)

    assert _public_names(module) - set(stub) == set(), "public names missing from the stub"
    assert {n for n in stub if not hasattr(module, n)} == set(), "stub names the module lacks"

    for attr, node in stub.items():
        value = getattr(module, attr)
        if isinstance(node, ast.FunctionDef):
            _check_signature(value, node)
        elif isinstance(node, ast.ClassDef):
            _check_class(value, node)
        elif isinstance(node, ast.AnnAssign):
            _check_constant(attr, value, node.annotation)


# What a constant's annotation names, by its outermost type ("tuple[str, ...]" -> tuple).
_CONSTANT_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "bytes": bytes,
                   "tuple": tuple, "list": list, "dict": dict, "frozenset": frozenset}


def _check_constant(name, value, annotation):
    outer = ast.unparse(annotation.value if isinstance(annotation, ast.Subscript) else annotation)
    if outer in _CONSTANT_TYPES:
        assert type(value) is _CONSTANT_TYPES[outer], f"{name}: {type(value).__name__}, stub says {outer}"


def _check_class(cls, node):
    assert isinstance(cls, type), f"{node.name} is not a class in the module"
    bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
    assert bases == [b.__name__ for b in cls.__bases__ if b is not object], f"{node.name}: bases"
    members = _stub_names(node.body)
    own = {n for n in vars(cls) if not n.startswith("_")}
    assert own - set(members) == set(), f"{node.name}: members missing from the stub"
    assert {n for n in members if not hasattr(cls, n)} == set(), f"{node.name}: stub members it lacks"
    for attr, member in members.items():
        if isinstance(member, ast.FunctionDef) and not _is_property(member):
            _check_signature(getattr(cls, attr), member)


def _is_property(node):
    return any(ast.unparse(d).endswith(("property", ".setter")) for d in node.decorator_list)
