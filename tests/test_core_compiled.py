"""Guard against a silent pure-Python fallback: every data-plane module must be a native build."""
import importlib
import importlib.machinery

import pytest

import fastgw._core


@pytest.mark.parametrize("name", fastgw._core.MODULES)
def test_core_module_is_a_compiled_extension(name):
    module = importlib.import_module(f"fastgw._core.{name}")
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


def test_every_pyx_is_listed():
    from pathlib import Path

    sources = {p.stem for p in Path(fastgw._core.__file__).parent.glob("*.pyx")}
    assert sources == set(fastgw._core.MODULES)


def test_every_pyx_has_a_pxd():
    # Its C-level interface (issue 19: every .pyx has a .pxd), empty for Python-level modules.
    from pathlib import Path

    folder = Path(fastgw._core.__file__).parent
    assert {p.stem for p in folder.glob("*.pyx")} == {p.stem for p in folder.glob("*.pxd")}
