"""Build the Cython data plane.

The extension list is explicit: a module that fails to compile fails the build instead of being
silently left out. FASTGW_DEBUG=1 writes annotated HTML next to each .pyx and turns on line tracing
(for py-spy/coverage line numbers inside Cython code).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTGW_DEBUG") == "1"
CORE_MODULES = ["buffer", "timer", "shm", "health", "uri", "router", "http1", "upstream", "balancer", "proxyproto",
                "sni", "tcp", "native", "ratelimit", "cache", "filters",
                "request", "answers", "observe", "retry", "protocol"]

macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
compile_args = ["-O2"] if not DEBUG else ["-O0", "-g"]

extensions = [
    Extension(
        f"fastgw._core.{name}",
        [f"fastgw/_core/{name}.pyx"],
        include_dirs=["fastgw/_core"],          # atomics.h
        define_macros=macros,
        extra_compile_args=compile_args,
    )
    for name in CORE_MODULES
]

# Bounds checks and negative indexing stay on: the hot paths index C buffers, where they cost
# nothing, and on Python objects they turn a bug into an exception instead of a crash.
directives = {
    "language_level": 3,
    "cdivision": True,
    "embedsignature": True,
}
if DEBUG:
    directives.update(linetrace=True, profile=True, boundscheck=True)

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
