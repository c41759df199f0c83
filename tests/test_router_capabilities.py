"""Tools ask the router class what a router does, never its name (issue 33).

What a router is and does is declared on its class (``routers.base.PluginRouterMixin``'s
capabilities) and found through the registry (``routers.ROUTERS``). The first test reads the
plugin's source (AST, no import) outside ``megatron_locmoe/routers/`` and finds no comparison
of a registered router name with anything and no table keyed by router names, but the few
uses of those words that are not a router (allow-listed, with the reason). The others check
that the tools read the class: a router registered under a new name gets the behaviour its
capabilities give, and the registered routers keep the behaviour their names used to give.
"""

from __future__ import annotations

import ast
import pathlib
from types import SimpleNamespace

import pytest

from megatron_locmoe.analysis import demo, placement, report
from megatron_locmoe.routers import ROUTERS, LocMoERouter, MegatronRouter
from megatron_locmoe.routers.base import PluginRouterMixin

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_locmoe"
NAMES = frozenset(ROUTERS)  # the registered routers, before any test registers another

ALLOWED = {
    ("megatron_locmoe/validation", 'locmoe.attention != "megatron"'): (
        "the attention implementation named megatron, not a router"
    ),
    ("megatron_locmoe/layer", '"locmoe" in router.keywords'): (
        "the router builder's keyword argument locmoe (the settings), not a router"
    ),
    ("megatron_locmoe", '"megatron" in sys.modules'): (
        "the megatron package, not a router (wherever the launcher keeps the test)"
    ),
    ("megatron_locmoe/analysis/costmodel", "PAPER_CLAIMS: {hash, switch}"): (
        "the LocMoE paper's measured speed-ups over its hash and switch baselines: data "
        "recorded from the paper, not a test of a run's router"
    ),
}
"""(where, expression) -> why it stays: router names that are not a test of a router. Where: a
module's path without ``.py``, matching it split into a package too, or a folder."""


def _names(node: ast.AST) -> list[str]:
    """The registered router names ``node`` is, or holds as a tuple / list / set literal."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and n.value in NAMES]


def _name_tests(path: pathlib.Path) -> list[str]:
    """Every comparison with a router name, ``case`` of one, and dict literal keyed by two or
    more of them (a table by router name), as 'expression' (a table: 'OWNER: {names}')."""
    src = path.read_text()
    found = []

    def visit(node: ast.AST, owner: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = owner
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = child.name
            elif isinstance(child, (ast.Assign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                inner = next((t.id for t in targets if isinstance(t, ast.Name)), owner)
            if isinstance(child, ast.Compare) and any(
                _names(side) for side in (child.left, *child.comparators)
            ):
                found.append(ast.get_source_segment(src, child))
            elif isinstance(child, ast.MatchValue) and _names(child.value):
                found.append(f"case {ast.get_source_segment(src, child.value)}")
            elif isinstance(child, ast.Dict):
                keys = [n for k in child.keys if k is not None for n in _names(k)]
                if len(keys) >= 2:
                    found.append(f"{owner}: {{{', '.join(keys)}}}")
            visit(child, inner)

    visit(ast.parse(src), "<module>")
    return found


def _all_name_tests() -> set[tuple[str, str]]:
    return {
        (str(path.relative_to(ROOT)), text)
        for path in sorted(PACKAGE.rglob("*.py"))
        if "routers" not in path.relative_to(PACKAGE).parts[:1]
        for text in _name_tests(path)
    }


def _allowed(path: str, text: str, module: str, allowed_text: str) -> bool:
    return text == allowed_text and (path == module + ".py" or path.startswith(module + "/"))


def test_no_tool_tests_a_router_by_its_name():
    """Outside routers/, a router's name is only ever looked up in the registry: a tool that
    tests it (``router_type == "hash"``, ``in ("locmoe", ...)``, a table keyed by names) is
    listed here; ask the router class a capability instead (add one to PluginRouterMixin)."""
    found = _all_name_tests()
    tests = sorted(
        f"{path}: {text}"
        for path, text in found
        if not any(_allowed(path, text, *entry) for entry in ALLOWED)
    )
    assert not tests, "router names tested outside the registry:\n" + "\n".join(tests)
    stale = sorted(
        f"{module}: {text}"
        for module, text in ALLOWED
        if not any(_allowed(*item, module, text) for item in found)
    )
    assert not stale, "allow-listed but gone (drop from ALLOWED):\n" + "\n".join(stale)


def test_the_scan_finds_each_form_of_name_test(tmp_path):
    """The scan sees a comparison, a membership test, a ``case`` and a table by name."""
    path = tmp_path / "tool.py"
    path.write_text(
        "def f(run):\n"
        "    if run.router_type == 'hash':\n"
        "        pass\n"
        "    if run.router_type in ('locmoe', 'locmoe_plus'):\n"
        "        pass\n"
        "    match run.router_type:\n"
        "        case 'switch':\n"
        "            pass\n"
        "LABELS = {'megatron': 'Megatron', 'hash': 'Hash'}\n"
        "FIELDS = {'locmoe': {}, 'steps': 1}\n"  # one name as a field key: not a table
    )
    assert _name_tests(path) == [
        "run.router_type == 'hash'",
        "run.router_type in ('locmoe', 'locmoe_plus')",
        "case 'switch'",
        "LABELS: {megatron, hash}",
    ]


# ---- the tools read the class: behaviour of a router registered under another name ----------


class _PlacedLocMoE(LocMoERouter):
    """LocMoE's capabilities under another name, declaring placement support."""

    name = "mine"
    label = "Mine"
    supports_expert_placement = True


class _UnplacedMegatron(MegatronRouter):
    """Megatron's capabilities under another name, without placement support."""

    name = "theirs"
    label = "Theirs"
    supports_expert_placement = False
    placement_obstacle = "its routing reads a table of expert ids"


@pytest.fixture
def registered(monkeypatch):
    for cls in (_PlacedLocMoE, _UnplacedMegatron):
        monkeypatch.setitem(ROUTERS, cls.name, cls)


def test_placement_asks_the_class(registered):
    placement.check_router("mine")
    with pytest.raises(placement.PlacementError) as e:
        placement.check_router("theirs")
    assert str(e.value) == (
        "cannot place the experts of a theirs router: its routing reads a table of expert ids; "
        "placement supports the megatron and switch and mine routers"
    )


def test_placement_refuses_a_router_without_the_capability_naming_it(monkeypatch):
    """A router class that declares nothing about placement is refused, by its name."""

    class Plain(PluginRouterMixin):
        name = "plain"

    monkeypatch.setitem(ROUTERS, "plain", Plain)
    with pytest.raises(placement.PlacementError) as e:
        placement.check_router("plain")
    assert str(e.value) == (
        "cannot place the experts of a plain router: its routing may read the expert index or "
        "the node map; placement supports the megatron and switch routers"
    )


def _args(router_type, **kw):
    return SimpleNamespace(
        moe_router_type=router_type,
        moe_router_topk=kw.get("topk", 1),
        moe_router_num_groups=kw.get("groups", 0),
        moe_router_group_topk=1,
        moe_aux_loss_coeff=kw.get("aux", 0.0),
        locmoe_locality_loss_coeff=kw.get("mu", 0.1),
        moe_expert_capacity_factor=kw.get("cf"),
    )


def test_labels_mu_and_figures_ask_the_class(registered):
    assert demo.run_label(_args("mine")) == "Mine top-1 (mu 0.1)"
    assert demo.run_label(_args("theirs", aux=0.01)) == "Theirs top-1 (aux loss)"
    assert demo._reads_mu("mine") and not demo._reads_mu("theirs")
    assert report._locmoe_series("mine") and not report._locmoe_series("theirs")


# ---- the registered routers keep what their names gave them --------------------------------


@pytest.mark.parametrize(
    "router_type, kw, label",
    [
        ("megatron", dict(aux=0.01, topk=2), "Megatron top-2 (aux loss)"),
        ("megatron", dict(topk=2), "Megatron top-2"),
        ("megatron", dict(topk=2, groups=2), "Megatron top-2, node-limited (1 node/token)"),
        ("locmoe", dict(topk=2, aux=0.01), "LocMoE top-2 (mu 0.1)"),
        ("locmoe_plus", dict(cf=1.1), "LocMoE+ top-1 (mu 0.1, capacity <= 1.1)"),
        ("hash", dict(cf=1.0, aux=0.01), "Hash top-1"),
        ("switch", dict(cf=1.0), "Switch top-1 (capacity 1.0)"),
        ("switch", dict(), "Switch top-1"),
    ],
)
def test_the_demo_labels_are_unchanged(router_type, kw, label):
    assert demo.run_label(_args(router_type, **kw)) == label


def test_the_registered_routers_keep_their_behaviour():
    """What each tool decided by name, now asked of the class: the same answers."""
    assert [n for n, c in ROUTERS.items() if c.supports_expert_placement] == ["megatron", "switch"]
    assert [n for n in ROUTERS if demo._reads_mu(n)] == ["locmoe", "locmoe_plus"]
    assert [n for n in ROUTERS if report._locmoe_series(n)] == ["locmoe"]
    assert [n for n in ROUTERS if ROUTERS[n].reads_setting("hash_token_counts")] == ["hash"]
    assert not demo._reads_mu(None) and not report._locmoe_series("unknown")
