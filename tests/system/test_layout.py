"""The packages' layout, read statically from their source (no import runs): no import circle among the modules of
hessian_core, actors and pipeline (imports inside functions counted too: a deferred import hides a circle, it
does not remove it), hessian_core never imports Ray, actors or pipeline, actors never imports pipeline, and
pipeline's run engine (pipeline.run) never imports its studies or reports."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("hessian_core", "actors", "pipeline")


def module_files() -> dict[str, str]:
    """Module name -> source file, for every module of the three packages (a package as its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if not file.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(folder, file)
    return found


def imported_names(module: str, file: str, *, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports, anywhere in its source: ``import a.b`` gives a.b, ``from a import b``
    gives a.b (a submodule, or a name of a: the caller keeps what exists), relative imports resolved."""
    with open(file) as f:
        tree = ast.parse(f.read(), filename=file)
    here = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports (the deepest existing module a name leads to)."""
    files = module_files()
    graph = {}
    for module, file in files.items():
        targets = set()
        for name in imported_names(module, file, is_package=file.endswith("__init__.py")):
            parts = name.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
        graph[module] = targets
    return graph


def external_imports(package: str) -> dict[str, set[str]]:
    """Module of ``package`` -> the top-level names it imports."""
    files = module_files()
    return {module: {name.split(".")[0] for name in imported_names(module, file, is_package=file.endswith("__init__.py"))}
            for module, file in files.items() if module.split(".")[0] == package}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    """The parser itself: a known function-level relative import of the code base shows up as an edge."""
    graph = import_graph()
    assert "hessian_core.precision" in graph["hessian_core.models.parallel"]  # `from ..precision import` at top
    assert {"hessian_core", "actors", "pipeline"} <= graph.keys()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_the_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_hessian_core_imports_neither_ray_nor_the_other_packages():
    bad = {module: sorted(names & {"ray", "actors", "pipeline"}) for module, names in external_imports("hessian_core").items()}
    assert not {m: n for m, n in bad.items() if n}


def test_actors_never_imports_pipeline():
    bad = {module: names for module, names in external_imports("actors").items() if "pipeline" in names}
    assert not bad


def test_the_run_engine_imports_neither_studies_nor_report():
    above = ("pipeline.studies", "pipeline.report", "pipeline.cli")
    graph = import_graph()
    assert "pipeline.run.driver" in graph and "pipeline.studies.sweep" in graph
    bad = {module: sorted(t for t in targets if t.startswith(above))
           for module, targets in graph.items() if module.startswith("pipeline.run")}
    assert not {m: t for m, t in bad.items() if t}


def calls_named(names: set[str]) -> dict[str, list[str]]:
    """Module -> the calls in it whose function is one of ``names`` (``x.name(...)`` or ``name(...)``)."""
    found: dict[str, list[str]] = {}
    for module, file in module_files().items():
        with open(file) as f:
            tree = ast.parse(f.read(), filename=file)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if name in names:
                    found.setdefault(module, []).append(name)
    return found


def test_models_are_built_in_one_place():
    """Only hessian_core.models.build constructs a model from a config or reads one whole through transformers,
    and only it touches torch's default dtype (which transformers changes process-wide while it builds)."""
    found = calls_named({"set_default_dtype", "from_config", "_from_config", "set_default_tensor_type"})
    assert set(found) == {"hessian_core.models.build"}, found
    models = calls_named({"from_pretrained"})
    assert {m for m in models if m != "hessian_core.models.build"} <= {
        "hessian_core.models.config", "pipeline.run.sanity", "pipeline.run.data"}, models  # configs and tokenizers only
