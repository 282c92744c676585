"""The code layout stays true: imports flow jobs -> training/curation -> schemas, the parts of
curation/ import each other one way only and never the methods, and every third-party package the
code imports is declared in pyproject.toml (so `pip install .` alone is enough to run it)."""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("curation", "training", "schemas", "jobs")

# What each top-level package may import from the first-party ones.
LAYERS = {"schemas": set(), "curation": {"schemas"}, "training": {"curation", "schemas"},
          "jobs": {"curation", "training", "schemas"}}

# Inside curation/: which parts a part may import (itself always). `methods` and `stage_job`
# compose the parts and may import all of them; no part imports a composer.
PARTS = {
    "failpoints": set(),
    "compute": set(),
    "data": set(),
    "lm": set(),
    "select": set(),
    "store": {"data", "failpoints"},
    "influence": {"store", "lm", "data", "failpoints"},
    "oracle": {"lm", "store", "influence", "data", "failpoints"},
}
COMPOSERS = {"methods", "stage_job"}


def modules():
    """(module name, path) of every first-party module."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(p for p in parts if p != "__init__"), path


def imports(path: pathlib.Path) -> set[str]:
    """Every absolute module name imported anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from curation import metadata` imports the submodule curation.metadata
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def curation_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "curation" and len(parts) > 1 else None


def test_imports_follow_the_layers():
    wrong = []
    for module, path in modules():
        top = module.split(".")[0]
        for name in imports(path):
            target = name.split(".")[0]
            if target in PACKAGES and target != top and target not in LAYERS[top]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, "imports against jobs -> training/curation -> schemas:\n" + "\n".join(wrong)


def test_curation_parts_import_one_way_and_never_the_methods():
    known = set(PARTS) | COMPOSERS
    wrong = []
    for module, path in modules():
        part = curation_part(module)
        if part is None or part in COMPOSERS:
            continue
        assert part in known, f"curation/{part} is not a known part; add it to PARTS with what it may import"
        for name in imports(path):
            target = curation_part(name)
            if target is None or target == part:
                continue
            if target in COMPOSERS or target not in PARTS[part]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, "curation/ part imports against the layout:\n" + "\n".join(wrong)


def test_the_allowed_part_graph_has_no_cycle():
    seen, done = set(), set()

    def visit(part, path):
        assert part not in seen - done, f"cycle: {' -> '.join(path + [part])}"
        if part in done:
            return
        seen.add(part)
        for target in PARTS[part]:
            visit(target, path + [part])
        done.add(part)

    for part in PARTS:
        visit(part, [])


def test_every_module_is_under_400_lines_and_curation_top_level_is_small():
    long = [f"{path.relative_to(ROOT)} ({n})" for _, path in modules()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400]
    assert not long, f"modules over 400 lines: {long}"
    top = sorted(p.name for p in (ROOT / "curation").glob("*.py"))
    assert len(top) <= 6, f"curation/ holds {len(top)} modules directly: {top}"


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_third_party_imports_are_declared_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_normalised(re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0]) for dep in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, path in modules():
        for name in imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in PACKAGES:
                continue
            assert top in distributions, f"{module} imports {top!r}, which no installed distribution provides"
            if not any(_normalised(d) in declared for d in distributions[top]):
                missing.setdefault(distributions[top][0], set()).add(module)
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"
