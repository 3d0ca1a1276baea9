"""The package declares what its code imports (pyproject dependencies), with floors that provide the APIs used."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import ROOT

PACKAGES = ("app", "modules", "datamodules", "callbacks")


def _third_party_imports() -> set[str]:
    names = set()
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES and n != "__future__"}


def _declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for group in project.get("optional-dependencies", {}).values() for d in group]
    declared = {}
    for spec in specs:
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
        declared[re.sub(r"[-_.]+", "-", name).lower()] = spec
    return declared


def test_every_imported_distribution_is_declared():
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [module])}
        if not dists & declared.keys():
            missing[module] = sorted(dists)
    assert not missing, f"pyproject.toml does not declare the distributions of these imports: {missing}"


def test_lightning_floor_provides_weight_averaging():
    spec = _declared()["lightning"]
    floor = re.search(r">=\s*([\d.]+)", spec).group(1)
    assert tuple(int(x) for x in floor.split(".")[:2]) >= (2, 6), spec  # lightning.pytorch.callbacks.WeightAveraging
