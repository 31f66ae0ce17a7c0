"""The package's parts import one way: the method never imports the embedded world or the demo's
orchestration, and each of its subpackages imports only the parts docs/ARCHITECTURE.md allows."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vild_d2")
METHOD = {"baselines", "checkpoint", "config", "data", "distill", "engine", "evaluation", "modeling",
          "teacher", "utils"}
# part -> the parts of vild_d2 it may import (docs/ARCHITECTURE.md)
ALLOWED = {
    "utils": set(),
    "config": set(),
    "checkpoint": {"utils"},
    "teacher": {"utils"},
    "distill": {"checkpoint", "teacher", "utils"},
    "data": {"distill", "teacher", "utils"},
    "modeling": {"teacher", "utils"},
    "evaluation": {"utils"},
    "baselines": {"distill", "modeling", "teacher", "utils"},
    "engine": {"checkpoint", "config", "data", "distill", "evaluation", "modeling", "teacher", "utils"},
    "shapes_world": METHOD,
    "pipeline": METHOD | {"shapes_world"},
}


def _part(module: str) -> str:
    """'vild_d2.distill.region_crops' -> 'distill'; 'vild_d2.utils' -> 'utils'."""
    return module.split(".")[1]


def _imports(path: str, module: str):
    """The vild_d2 modules a file imports, relative imports resolved."""
    tree = ast.parse(open(path).read(), path)
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("vild_d2."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                yield from names
            elif node.module and node.module.startswith("vild_d2."):
                yield node.module


def _modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_every_part_of_the_package_is_in_the_layering_table():
    parts = {_part(m) for _, m in _modules() if m != "vild_d2"}
    assert parts == set(ALLOWED)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(part):
    wrong = []
    for path, module in _modules():
        if module == "vild_d2" or _part(module) != part:
            continue
        for target in _imports(path, module):
            other = _part(target) if target.count(".") else None
            if other and other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_the_import_check_sees_relative_and_absolute_imports(tmp_path):
    """The checker itself: both forms of a forbidden import are found."""
    path = tmp_path / "m.py"
    path.write_text("from ..shapes_world import generator\nimport vild_d2.pipeline.run\n"
                    "from . import region_crops\n")
    found = set(_imports(str(path), "vild_d2.distill.m"))
    assert found == {"vild_d2.shapes_world", "vild_d2.pipeline.run", "vild_d2.distill.region_crops"}


def test_import_vild_d2_loads_the_method_alone():
    code = ("import sys, vild_d2, vild_d2.engine, vild_d2.distill; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vild_d2'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split()
    assert "vild_d2.modeling.roi_heads" in loaded and "vild_d2.distill.region_encoder" in loaded
    assert not [m for m in loaded if m != "vild_d2" and _part(m) not in METHOD], loaded
