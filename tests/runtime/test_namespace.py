"""The package namespace: importing the exporter's modules never shadows the ``fxbridge.export()`` function."""
import importlib
import subprocess
import sys


def test_import_of_submodules_keeps_export_function():
    code = ("import fxbridge, fxbridge.exporter, fxbridge.exporter.graph; import fxbridge.exporter.writers as w; "
            "assert callable(fxbridge.export) and not isinstance(fxbridge.export, type(fxbridge)), fxbridge.export; "
            "assert fxbridge.exporter.graph.build_graph")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_submodule_is_named_like_a_public_function():
    import fxbridge
    for name in fxbridge.__all__:
        obj = getattr(fxbridge, name)
        if callable(obj) and not isinstance(obj, type):
            assert importlib.util.find_spec(f"fxbridge.{name}") is None, f"fxbridge.{name} is both a function and a module"
