"""The house layout (DESIGN.md section 6), read from the source: layers only import downward.

Every ``nmcli`` import, function-local ones included, is checked:

* a module imports only its own layer and the layers below it, and no two modules import each
  other, directly or through others;
* a function-local nmcli import is there only to defer a heavy package: the imported module
  (or one it imports at module level) imports torch, onnx, onnxruntime, tensorrt or
  transformers at module level, and the importing module does not already import it;
* no module imports another module's private (``_``-prefixed) names.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "nmcli"
HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt", "transformers", "matplotlib", "safetensors.torch")

# Bottom first. A module's layer is the first entry that its dotted name starts with.
LAYERS: list[tuple[str, ...]] = [
    (
        "nmcli",
        "nmcli.errors",
        "nmcli.progress",
        "nmcli.io",
        "nmcli.inputs",
        "nmcli.device",
        "nmcli.usercode",
        "nmcli.trust",
        "nmcli.memory",
        "nmcli.member",
    ),
    ("nmcli.nm",),
    ("nmcli.formats",),
    ("nmcli.models",),
    ("nmcli.algorithms",),
    ("nmcli.pipelines",),
    ("nmcli.export", "nmcli.bench"),
    ("nmcli.commands",),
    ("nmcli.cli", "nmcli.__main__"),
]
# The layers whose modules import no heavy package at import time (DESIGN.md section 6), and the
# modules that do, with the reason.
TORCH_FREE_LAYERS = 3  # the base, nm/ and formats/
HEAVY_AT_IMPORT_ALLOWED = {
    "nmcli.inputs": "an input spec carries torch dtypes (InputTensor.dtype, FLOAT_PRECISIONS)",
    "nmcli.formats.onnx_layout": "reads ONNX initializers into torch tensors for the N:M checks of nmcli.nm.masks",
}
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    names: tuple[str, ...]
    local: bool
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best = -1
    rank = -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to DESIGN.md section 6)")
    return rank


def resolve(target: str, name: str) -> str:
    """The module an ``from target import name`` reaches (a submodule, or ``target`` itself)."""
    return f"{target}.{name}" if f"{target}.{name}" in MODULES else target


def walk_imports(module: str) -> Iterator[Import]:
    tree = ast.parse(MODULES[module].read_text())

    def visit(node: ast.AST, local: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield Import(module, child.module, tuple(a.name for a in child.names), inside, child.lineno)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, (), inside, child.lineno)
            yield from visit(child, inside)

    yield from visit(tree, False)


def type_checking_lines(module: str) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


IMPORTS = {m: list(walk_imports(m)) for m in MODULES}
RUNTIME = {m: [i for i in IMPORTS[m] if i.line not in type_checking_lines(m)] for m in MODULES}


def nmcli_edges(module: str) -> Iterator[tuple[Import, str]]:
    for imp in RUNTIME[module]:
        if imp.target == "nmcli" or imp.target.startswith("nmcli."):
            targets = {resolve(imp.target, n) for n in imp.names} if imp.names else {imp.target}
            for target in targets:
                if target != module and target in MODULES:
                    yield imp, target


def heavy_at_top(module: str, seen: set[str] | None = None) -> set[str]:
    """Heavy packages that importing ``module`` loads (module-level imports, transitively)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    found: set[str] = set()
    for imp in RUNTIME[module]:
        if imp.local:
            continue
        root = imp.target
        if any(root == h or root.startswith(h + ".") for h in HEAVY):
            found.add(root.split(".")[0])
    for imp, target in nmcli_edges(module):
        if not imp.local:
            found |= heavy_at_top(target, seen)
    return found


def test_every_import_points_down() -> None:
    upward = [
        f"{imp.importer}:{imp.line} imports {target} (layer {layer_of(target)} above {layer_of(imp.importer)})"
        for module in MODULES
        for imp, target in nmcli_edges(module)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles() -> None:
    graph = {m: {t for _, t in nmcli_edges(m)} for m in MODULES}
    # an import of a package's __init__ from its own submodule is how Python loads it: not a circle
    for m, targets in graph.items():
        graph[m] = {t for t in targets if not m.startswith(t + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not circles, f"import circles: {circles}"


def test_local_imports_only_defer_heavy_packages() -> None:
    needless = []
    for module in MODULES:
        if module.startswith("nmcli.cli"):
            continue  # the CLI defers every command's imports so that --help starts fast
        own = heavy_at_top(module)
        for imp, target in nmcli_edges(module):
            if imp.local and not (heavy_at_top(target) - own):
                needless.append(f"{module}:{imp.line} imports {target} inside a function, deferring nothing heavy")
    assert not needless, "\n".join(needless)


def test_the_lower_layers_are_torch_free_at_import() -> None:
    heavy = {
        module: sorted(heavy_at_top(module))
        for module in MODULES
        if layer_of(module) < TORCH_FREE_LAYERS and module not in HEAVY_AT_IMPORT_ALLOWED and heavy_at_top(module)
    }
    assert not heavy, f"modules of the base, nm/ and formats/ that import heavy packages at import: {heavy}"


def test_no_private_names_across_modules() -> None:
    private = [
        f"{imp.importer}:{imp.line} imports {name} from {imp.target}"
        for module in MODULES
        for imp in IMPORTS[module]
        if imp.target.startswith("nmcli")
        for name in imp.names
        if name.startswith("_") and not name.startswith("__") and resolve(imp.target, name) != module
    ]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_function_sizes(module: str) -> None:
    source = MODULES[module].read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines (limit {MAX_MODULE_LINES}): split it"
    long = [
        f"{node.name} ({(node.end_lineno or node.lineno) - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
