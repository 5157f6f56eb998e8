"""The runtime build: a loaded config made into the tables the data plane runs (build.py), and the
config load with the checks that need the plugins and the compiler (load.py). The one package that
knows every package below the server (README.md, "Layers")."""
