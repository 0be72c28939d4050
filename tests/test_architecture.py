"""The package layering (no import circles, one direction, no private imports) and the zoo's registration API.

The import graph is read from the source with `ast`.
Every import counts, deferred ones inside functions included: a circle held together by a function-level import
is still a circle (it only moves the failure from import time to call time). Imports under `if TYPE_CHECKING:`
never run and are left out.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from einops import einsum
from torch import nn

import zoo
import zoo._registry as zoo_registry
from shapnets import Explanation, SelfExplaining, exact_shapley
from shapnets.contract import no_layers, rename_args
from zoo._args import encode_model_args

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shapnets", "zoo", "training")
# Which packages each package may import from (training -> zoo -> shapnets, never back).
ALLOWED = {"shapnets": {"shapnets"}, "zoo": {"zoo", "shapnets"}, "training": {"training", "zoo", "shapnets"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers of statements under `if TYPE_CHECKING:` (never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from pkg import name` the package.
                found.append((sub, None, node.lineno) if sub in modules else (target, alias.name, node.lineno))
    return found


@functools.cache  # parsed once per session: the source does not change under the tests
def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str | None, int]]]]:
    modules = _modules()
    imports = {name: _imports(name, path, modules) for name, path in modules.items()}
    graph = {name: {target for target, _, _ in found if target in modules and target != name}
             for name, found in imports.items()}
    return graph, imports


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_the_packages() -> None:
    graph, _ = _graph()
    # A parser that found nothing would pass every test below: check it reads known edges.
    assert {"shapnets", "zoo", "training", "training.trainer", "zoo.hub"} <= set(graph)
    assert "training.config" in graph["training.trainer"]
    assert "shapnets.coalitions" in graph["shapnets.oracle"]


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    graph, _ = _graph()
    assert _cycles(graph) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_one_way(package: str) -> None:
    _, imports = _graph()
    wrong = [f"{module}:{line} imports {target}" for module, found in imports.items() if module.split(".")[0] == package
             for target, _, line in found if target.split(".")[0] not in ALLOWED[package]]
    assert wrong == []


def test_no_private_name_imported_across_packages() -> None:
    _, imports = _graph()
    wrong = []
    for module, found in imports.items():
        for target, name, line in found:
            if target.split(".")[0] == module.split(".")[0]:
                continue  # inside one package, private helpers are shared on purpose
            private = [p for p in [*target.split("."), name or ""] if p.startswith("_")]
            if private:
                wrong.append(f"{module}:{line} imports {target}{'.' + name if name else ''}")
    assert wrong == []


# ------------------------------------------------------------------------------------------------ adding a family
class ToyLinear(nn.Module):
    """A linear self-explaining model: its Shapley values (zero reference) are `w_ci * x_i`, exactly."""

    def __init__(self, in_features: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def explain(self, x: torch.Tensor, layers: bool = False) -> Explanation:
        no_layers(self, layers)
        attributions = einsum(x, self.linear.weight, "b i, c i -> b i c")
        return Explanation(attributions=attributions, base=self.linear.bias.expand(len(x), -1), output=self(x),
                           exact=True)


@pytest.fixture
def toy_family() -> Iterator[str]:
    yield "toy_linear"
    # Registration is global; take the name out of the zoo's tables again so that other tests see only real names.
    for table in (zoo.ARCHITECTURES, zoo.VARIANT_DEFAULTS, zoo_registry.ENTRIES):
        for name in ("toy_linear", "toy_linear_wide"):
            table.pop(name, None)


def test_a_family_registered_in_three_lines_is_created_saved_and_loaded(toy_family: str, tmp_path: Path) -> None:
    zoo.register(toy_family, ToyLinear, zoo.model_cfg(description="a linear toy family"))
    zoo.register_variant(f"{toy_family}_wide", toy_family, dict(in_features=5, num_classes=4),
                         zoo.model_cfg(description="the toy family on 5 features, 4 classes"))

    model = zoo.create_model(toy_family, in_features=4)
    assert type(timm.create_model(toy_family)) is ToyLinear and toy_family in zoo.list_models("toy_*")
    assert isinstance(model, SelfExplaining) and model.model_args == {"in_features": 4, "num_classes": 2}
    x = torch.randn(3, 4, dtype=torch.float64)
    model.double()
    exact = exact_shapley(model, x)
    torch.testing.assert_close(model.explain(x).attributions, exact.attributions)

    loaded = zoo.load_pretrained(zoo.save_pretrained(model, tmp_path / "toy"))
    assert type(loaded) is ToyLinear and loaded.pretrained_cfg["description"] == "a linear toy family"
    torch.testing.assert_close(loaded(x), model(x))

    wide = zoo.create_model(f"{toy_family}_wide")
    assert (wide.linear.in_features, wide.num_classes) == (5, 4)
    with pytest.raises(RuntimeError, match=f"{toy_family}_wide has no shipped weights"):
        zoo.create_model(f"{toy_family}_wide", pretrained=True)


def test_registration_errors_name_the_problem(toy_family: str) -> None:
    with pytest.raises(TypeError, match=r"must be an nn\.Module class"):
        zoo.register(toy_family, lambda: None)
    with pytest.raises(ValueError, match="'nowhere' is not a registered generic name"):
        zoo.register_variant(f"{toy_family}_wide", "nowhere", {})


@pytest.mark.parametrize("name", sorted(zoo.VARIANT_DEFAULTS))
def test_documented_variant_arguments_agree_with_the_shipped_config(name: str) -> None:
    # A variant's architecture is written in its documented defaults and in the config.json of its shipped weights
    # (which wins when building); they must not drift apart.
    folder = zoo.shipped_dir(name)
    if not (folder / "config.json").is_file():
        pytest.skip(f"no shipped weights for {name}")
    recorded = rename_args(zoo.model_class(name), zoo.read_config(folder)["model_args"], warn=False)
    documented = encode_model_args(zoo.VARIANT_DEFAULTS[name][1])
    reference = documented.pop("reference", None)
    assert {k: recorded.get(k) for k in documented} == documented
    if reference is not None:  # recorded as the float32 buffer, documented as the number it was made from
        torch.testing.assert_close(torch.tensor(recorded["reference"], dtype=torch.float64).flatten(),
                                   torch.full((1,), float(reference), dtype=torch.float64), atol=1e-6, rtol=0)
