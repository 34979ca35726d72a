"""The house's layering (docs/architecture.md): every import between koala's parts goes to a lower layer."""

import ast
from pathlib import Path

import koala

# top to bottom, as docs/architecture.md draws them; a part may import only parts of the layers below its own
LAYERS = [
    ["cli"],
    ["app", "eval"],
    ["analyze", "lab"],
    ["bench"],
    ["compress", "inference", "distill"],
    ["formats", "data"],
    ["card"],
    ["families"],
    ["arch"],
    ["koala", "utils", "recipes", "testing", "safety"],  # koala: the package itself (__version__)
    ["errors"],
]
SRC = Path(koala.__file__).resolve().parent


def _part(module: str) -> str:
    """The top-level part of a koala module (``koala.distill.step`` -> distill); names defined in the package's
    ``__init__`` (``koala.KoalaError``, ``koala.__version__``) belong to the part ``koala``."""
    parts = module.split(".")
    if len(parts) > 1 and ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()):
        return parts[1]
    return "koala"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The koala modules ``path`` imports (every import, also those inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "koala"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "koala":
                # `from . import x` / `from .. import x`: x may be a module of that package
                out |= {f"{name}.{a.name}" if name.count(".") == 0 else name for a in node.names}
    return out


def test_every_part_is_in_one_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or p.is_dir()}
    parts = {("koala" if p == "__init__" else p) for p in parts if not p.startswith(("__pycache__", "."))}
    parts -= {"assets", "configs"}
    placed = [p for layer in LAYERS for p in layer]
    assert len(placed) == len(set(placed))
    assert parts == set(placed), f"place these parts in LAYERS and docs/architecture.md: {parts ^ set(placed)}"


def test_imports_only_go_down():
    level = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        src = _part(_module_name(path))
        for target in sorted(_imports(path)):
            dst = _part(target)
            if dst != src and level[dst] <= level[src]:
                upward.append(f"{path.relative_to(SRC.parent)}: {src} -> {dst}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)
