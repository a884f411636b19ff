"""The architecture as the imports show it, read from the source files (nothing is imported).

- ``evaluation`` (the metrics library) never imports ``pml_largest_margin``.
- Inside ``pml_largest_margin`` only the application layer (``cli``, ``demo``, ``training``) imports
  ``evaluation``; the library (losses, regularizers, margins, prototypes, distributed) does not.
- The library never imports the application layer, and no two modules import each other in a cycle
  (imports under ``if TYPE_CHECKING:``, for type hints only, count for the layers but not as cycles:
  they never run).
- Each package imports pytorch-metric-learning in one module (``_pml.py``), so that a port to
  another major version of it starts there.
- No file of the project refers to documents outside the repository.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pml_largest_margin", "evaluation")
APPLICATION = ("pml_largest_margin.cli", "pml_largest_margin.demo", "pml_largest_margin.training")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def typing_only_nodes(tree: ast.AST) -> set[int]:
    """``id`` of every node inside an ``if TYPE_CHECKING:`` block."""
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            nodes.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return nodes


def imported_modules(path: Path, *, typing_only: bool = True) -> set[str]:
    """Absolute names of the project modules that ``path`` imports (relative imports resolved);
    without ``typing_only``, those imported under ``if TYPE_CHECKING:`` are left out."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = set() if typing_only else typing_only_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from package import module`` imports a module too.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {module for module in found if module.split(".")[0] in PACKAGES}


def source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for path in source_files()}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name refers to (a name imported from a module maps to it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(*, typing_only: bool = True) -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = imported_modules(path, typing_only=typing_only)
        targets = {resolve(target, modules) for target in imported}
        graph[name] = {target for target in targets if target and target != name}
    return graph


def in_layer(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_the_graph_is_read():
    graph = import_graph()
    assert "pml_largest_margin.losses.fused" in graph["pml_largest_margin.losses"] | {
        target for targets in graph.values() for target in targets
    }
    assert "evaluation.reid.protocol" in graph["evaluation.reid"]


def test_evaluation_never_imports_pml_largest_margin():
    offenders = {
        (module, target)
        for module, targets in import_graph().items()
        if module.startswith("evaluation")
        for target in targets
        if target.startswith("pml_largest_margin")
    }
    assert not offenders


def test_only_the_application_layer_imports_evaluation():
    offenders = {
        (module, target)
        for module, targets in import_graph().items()
        if module.startswith("pml_largest_margin") and not in_layer(module, APPLICATION)
        for target in targets
        if target.startswith("evaluation")
    }
    assert not offenders


def test_the_library_never_imports_the_application_layer():
    offenders = {
        (module, target)
        for module, targets in import_graph().items()
        if not in_layer(module, APPLICATION)
        for target in targets
        if in_layer(target, APPLICATION)
    }
    assert not offenders


def test_type_checking_imports_are_recognised():
    # evaluation.reid.bootstrap names ReIDResult in its hints only: protocol imports bootstrap.
    assert "evaluation.reid.protocol" in import_graph()["evaluation.reid.bootstrap"]
    assert (
        "evaluation.reid.protocol"
        not in import_graph(typing_only=False)["evaluation.reid.bootstrap"]
    )


def test_no_import_cycles():
    graph = import_graph(typing_only=False)
    # A package's __init__ re-exports its own submodules: those edges are not cycles of design.
    edges = {
        module: {target for target in targets if not target.startswith(module + ".")}
        for module, targets in graph.items()
    }
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, path: list[str]) -> bool:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycle.extend(path[path.index(target) :] + [target] if target in path else [target])
                return True
            if state.get(target) is None and visit(target, path + [target]):
                return True
        state[module] = 2
        return False

    for module in sorted(edges):
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("needle", ["SPEC", "shared/", "DESIGN.md"])
def test_no_reference_outside_the_repository(needle):
    tracked = [
        path
        for pattern in ("*.py", "*.md", "*.toml", "*.sh")
        for path in ROOT.rglob(pattern)
        # mutants/ is the mutation tool's git-ignored working copy of the repository.
        if not {".git", "mutants"} & set(path.relative_to(ROOT).parts)
        and path.resolve() != Path(__file__).resolve()
    ]
    offenders = [str(path.relative_to(ROOT)) for path in tracked if needle in path.read_text()]
    assert not offenders


PML_GATEWAYS = {"pml_largest_margin/_pml.py", "evaluation/pml/_pml.py"}


def third_party_imports(path: Path, package: str) -> set[str]:
    """Names of the modules of ``package`` that ``path`` imports, wherever the import statement
    sits (module level, inside a function, under ``if TYPE_CHECKING:``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == package}


def test_pytorch_metric_learning_is_imported_by_one_module_per_package():
    importers = {
        str(path.relative_to(ROOT))
        for path in source_files()
        if third_party_imports(path, "pytorch_metric_learning")
    }
    assert importers == PML_GATEWAYS


def test_the_pml_import_check_reads_lazy_imports(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from pytorch_metric_learning.losses import ArcFaceLoss\n")
    assert third_party_imports(source, "pytorch_metric_learning") == {
        "pytorch_metric_learning.losses"
    }
