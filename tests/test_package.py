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
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def _import_graph() -> dict[str, set[str]]:
    """premoe's module import graph, lazy (function-level) imports included."""
    import ast
    from pathlib import Path

    root = Path(premoe.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        mod = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("premoe"):
                deps.add(node.module)
                deps |= {
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if (root.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                }
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{mod}: use absolute imports"
        graph[mod] = deps
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    assert "premoe.cli" in graph and "premoe.moe.kind" in graph  # the graph covers the package
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in graph.get(mod, ()):
            if dep in graph and state.get(dep) == 1:
                raise AssertionError(
                    "import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]) if dep in path else dep
                )
            if dep in graph and not state.get(dep):
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in graph:
        if not state.get(mod):
            visit(mod, [mod])


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


# package -> the premoe packages and top-level modules it may import
LAYERS = {
    "premoe.core": {"premoe.core", "premoe.errors", "premoe._version"},
    "premoe.moe": {"premoe.moe", "premoe.core", "premoe.errors", "premoe._version"},
    "premoe.dense": {"premoe.dense", "premoe.core", "premoe.errors", "premoe._version"},
    "premoe.server": {"premoe.server", "premoe.core", "premoe.errors", "premoe._version"},
    "premoe.vllm": {"premoe.vllm", "premoe.moe", "premoe.server", "premoe.core", "premoe.errors", "premoe._version"},
    "premoe.assets": set(),
}


def test_layers_hold():
    """core/ is a shared layer (nothing above it), moe/ and dense/ never import each other, server/ sits on
    core/ only; lazy imports inside functions count."""
    bad = []
    for mod, deps in _import_graph().items():
        allowed = LAYERS.get(_package(mod))
        if allowed is None:
            continue
        for dep in deps:
            if _package(dep) not in allowed and dep not in allowed:
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_quantisation_methods_are_compared_only_in_core_quant():
    """Formats are classes looked up by quant_method; nothing else compares a method name."""
    import ast
    from pathlib import Path

    root = Path(premoe.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path.parent.name == "quant":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(v in ("fp8", "mxfp4") for v in consts):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


def test_every_verb_is_one_module_named_after_it():
    from premoe.cli import VERBS, build_parser

    build_parser()
    for verb in VERBS:
        mod = importlib.import_module(f"premoe.verbs.{verb}")
        assert callable(mod.add_parser) and callable(mod.run), verb


def test_option_choices_are_the_registries_names():
    """The torch-free names the CLI offers are exactly what the implementations register."""
    from premoe.core.quant import FORMATS
    from premoe.dense.options import METHOD_NAMES, SCORE_NAMES
    from premoe.dense.plans import METHODS
    from premoe.dense.scoring import METRICS
    from premoe.moe.compensate import COMPENSATIONS
    from premoe.moe.options import COMPENSATION_NAMES, SCORER_NAMES
    from premoe.moe.scoring import SCORERS

    assert SCORER_NAMES == tuple(SCORERS) and METHOD_NAMES == tuple(METHODS) and SCORE_NAMES == tuple(METRICS)
    assert set(COMPENSATION_NAMES) == set(COMPENSATIONS)
    assert all(cls.method == name for name, cls in FORMATS.items())
