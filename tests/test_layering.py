"""Dependencies point one way: `h2ot/` (pure PyTorch) imports nothing of `jobs`, `pipelines`, `cluster`, nor
`ray` or `mlflow`; `pipelines/` never imports `jobs`. Read from the source with `ast`, so an import inside a
function (a lazy one) counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "h2ot": {"jobs", "pipelines", "cluster", "ray", "mlflow"},
    "pipelines": {"jobs"},
}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, at any depth; relative imports are resolved."""
    parts = [package, *path.relative_to(REPO / package).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    here = parts if path.name == "__init__.py" else parts[:-1]  # the package the file is in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from . import jobs`
    return sorted(out)


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in imported_modules(path, package):
            top = module.split(".")[0]
            if top in FORBIDDEN[package]:
                found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    assert violations(package) == []


def test_the_checker_sees_lazy_imports_at_any_depth(tmp_path: Path, monkeypatch) -> None:
    """The reader itself: imports inside functions and methods count; relative imports stay in the package."""
    root = tmp_path / "repo"
    (root / "h2ot" / "sub").mkdir(parents=True)
    (root / "h2ot" / "sub" / "__init__.py").write_text("from .m import f\n")
    (root / "h2ot" / "sub" / "m.py").write_text(
        "import numpy\n"
        "def f():\n    import ray.data\n"
        "class A:\n    def g(self):\n        from mlflow.tracking import MlflowClient\n"
        "from ..jobs import train\n"  # h2ot.jobs: inside the package, allowed
        "import jobs.train as t, os\n"
        "if numpy:\n    from pipelines import build_shards\n"
    )
    monkeypatch.setattr(__import__(__name__), "REPO", root)
    assert violations("h2ot") == [
        "h2ot/sub/m.py:3 imports ray.data",
        "h2ot/sub/m.py:6 imports mlflow.tracking",
        "h2ot/sub/m.py:6 imports mlflow.tracking.MlflowClient",
        "h2ot/sub/m.py:8 imports jobs.train",
        "h2ot/sub/m.py:10 imports pipelines",
        "h2ot/sub/m.py:10 imports pipelines.build_shards",
    ]
