"""Package-level contracts."""

import importlib
import pkgutil

import premoe


def test_api_functions_are_not_shadowed_by_submodules():
    """Importing a submodule named like an API verb rebinds the package attribute to the module
    (this bit premoe.calibrate, premoe.plan, premoe.demo and premoe.evaluate once)."""
    for mod in pkgutil.iter_modules(premoe.__path__):
        if mod.name != "__main__":  # that one runs the CLI
            importlib.import_module(f"premoe.{mod.name}")
    for name in premoe.__all__:
        if name not in ("__version__", "PremoeError"):
            assert callable(getattr(premoe, name)) and not isinstance(getattr(premoe, name), type(premoe)), name


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from premoe.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
