"""The package is laid out by pipeline stage and every import points down the pipeline (no stage reaches back up)."""

import ast
from pathlib import Path

import hfqat

PACKAGE = Path(hfqat.__file__).parent
# earlier stages first; a module may import its own stage and any earlier one
STAGES = ["_version", "config", "distributed", "atomic", "quant", "train", "export", "hub", "integrations", "cli"]


def _stage(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[str]:
    """Absolute hfqat-relative module names imported by ``path`` (relative and ``hfqat.`` imports)."""
    package = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(PACKAGE).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                found.append(".".join(base + ([node.module] if node.module else [])) or "__init__")
            elif node.module and node.module.startswith("hfqat."):
                found.append(node.module[len("hfqat."):])
        elif isinstance(node, ast.Import):
            found += [a.name[len("hfqat."):] for a in node.names if a.name.startswith("hfqat.")]
    return [m for m in found if m]


def test_every_module_belongs_to_a_stage():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        assert _stage(".".join(rel.with_suffix("").parts)) in STAGES, f"{rel} is in no pipeline stage"


def test_imports_point_down_the_pipeline():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) == 1 and rel.name == "__init__.py":
            continue  # the public API gathers every stage
        own = STAGES.index(_stage(".".join(rel.with_suffix("").parts)))
        for module in _imports(path):
            if _stage(module) in STAGES and STAGES.index(_stage(module)) > own:
                offenders.append(f"{rel} imports {module}")
    assert not offenders, offenders


def test_each_stage_says_what_it_owns_and_may_import():
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        if init.exists():
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert "May import" in doc and len(doc.splitlines()) == 3, stage
