"""Check that keras_vqpix's imports run one way: no module imports a layer above its own, no circle.

Every `import` and `from ... import` of the package and of its CLI counts, also those inside
functions (a lazy import is still a dependency). The layers, lowest first, are `LAYERS`; a
module may import its own layer and the layers below. Run from the repository root:

    python tools/check_imports.py [ROOT]   # ROOT: another checkout (default: this one)

Exit 0 and a summary when the imports are clean; else exit 1 and one line per violation. A new
module must be placed in `LAYERS` (an unplaced module is a violation).
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

# The checkout to check (default: this one): `python tools/check_imports.py [ROOT]`.
ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
# (installed package name, folder)
PACKAGES = (("keras_vqpix", ROOT / "keras_vqpix"), ("keras_vqpix_cli", ROOT / "cli"))

# Lowest first. Data flows one way: data -> layers/models -> the run folder and sampling ->
# code maps and sample statistics -> training -> evaluation/export -> CLI.
LAYERS = (
    ("base", ("keras_vqpix", "keras_vqpix.config", "keras_vqpix.io", "keras_vqpix.replicas")),
    (
        "data: discover",
        ("keras_vqpix.data.discover", "keras_vqpix.data.demo_render", "keras_vqpix.data.lesions"),
    ),
    ("data: decode", ("keras_vqpix.data.decode",)),
    ("data", ("keras_vqpix.data", "keras_vqpix.data.*")),
    (
        "layers, metrics and the acquisition-noise model",
        (
            "keras_vqpix.layers",
            "keras_vqpix.layers.*",
            "keras_vqpix.metrics",
            "keras_vqpix.similarity",
            "keras_vqpix.noise",
        ),
    ),
    ("models", ("keras_vqpix.models", "keras_vqpix.models.*")),
    ("plots", ("keras_vqpix.plots",)),
    ("run folder", ("keras_vqpix.run_folder",)),
    ("sampling", ("keras_vqpix.sampling",)),
    ("code maps and sample statistics", ("keras_vqpix.codes", "keras_vqpix.sample_quality")),
    ("training", ("keras_vqpix.training", "keras_vqpix.training.*")),
    (
        "evaluation, export, synthetic data sets, judging and refining them, the prior's "
        "likelihood",
        (
            "keras_vqpix.evaluation",
            "keras_vqpix.export",
            "keras_vqpix.synthetic",
            "keras_vqpix.compare",
            "keras_vqpix.refine",
            "keras_vqpix.likelihood",
        ),
    ),
    ("cli", ("keras_vqpix_cli", "keras_vqpix_cli.*")),
)
# Modules documented as importing no TensorFlow (tools that only list files start fast).
NUMPY_ONLY = ("keras_vqpix.data.discover", "keras_vqpix.noise")


def module_files() -> dict[str, Path]:
    """Every module of the packages: dotted name -> file."""
    modules = {}
    for package, folder in PACKAGES:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules (of `modules`, or any other top-level name) that `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                # `from keras_vqpix import plots` imports the module keras_vqpix.plots.
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)
    return found


def layer_of(name: str) -> int | None:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return rank
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check() -> list[str]:
    modules = module_files()
    graph = {
        name: {m for m in imports_of(name, path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }
    problems = []
    for name in sorted(modules):
        rank = layer_of(name)
        if rank is None:
            problems.append(f"{name}: in no layer of tools/check_imports.py (place it in LAYERS)")
            continue
        for target in sorted(graph[name]):
            target_rank = layer_of(target)
            if target_rank is not None and target_rank > rank:
                problems.append(
                    f"{name} ({LAYERS[rank][0]}) imports {target} ({LAYERS[target_rank][0]}), "
                    "a layer above it"
                )
    for name in NUMPY_ONLY:
        heavy = sorted(
            m
            for m in imports_of(name, modules[name], modules)
            if m.split(".")[0] in ("tensorflow", "keras")
        )
        if heavy:
            problems.append(f"{name} is NumPy-only but imports {', '.join(heavy)}")
    problems += [f"import circle: {' <-> '.join(c)}" for c in circles(graph)]
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} import problem(s)")
        return 1
    modules = module_files()
    edges = sum(
        len({m for m in imports_of(n, p, modules) if m in modules and m != n})
        for n, p in modules.items()
    )
    print(
        f"{len(modules)} modules, {edges} imports between them, {len(LAYERS)} layers: "
        "no module imports a layer above its own, no import circle"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
