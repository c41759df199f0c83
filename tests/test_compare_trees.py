"""benchmarks/compare_trees.py reads the rows of the router and layer benchmarks' JSON (no
timing: the parsing and the ratio against a sibling baseline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_trees.py"
_spec = importlib.util.spec_from_file_location("compare_trees", _PATH)
compare_trees = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_trees)


def test_rows_of_the_router_and_layer_benchmarks():
    router = {  # router_bench's layout
        "card": "cpu",
        "shapes": [
            {
                "shape": [2048, 512, 64, 4],
                "routers": {
                    "megatron_aux": {"ms": 6.0, "vs_megatron": 1.0},
                    "locmoe": {"ms": 4.8, "vs_megatron": 0.8, "alone_ms": 4.0},
                },
            },
        ],
    }
    got = compare_trees.rows(router)
    assert got == {
        "shapes/[2048, 512, 64, 4]/routers/megatron_aux": (6.0, 1.0),
        "shapes/[2048, 512, 64, 4]/routers/locmoe": (4.8, 0.8),
    }
    layer = {
        "shapes": [
            {
                "shape": {"T": 8},
                "layers": {"megatron_local": {"ms": 100.0}, "plugin": {"ms": 130.0}},
            }
        ]
    }
    got = compare_trees.with_baseline(compare_trees.rows(layer), "megatron_local")
    assert got["shapes/{'T': 8}/layers/plugin"] == (130.0, 1.3)
    assert got["shapes/{'T': 8}/layers/megatron_local"] == (100.0, 1.0)
    # without a baseline the rows keep no ratio
    assert compare_trees.rows(layer)["shapes/{'T': 8}/layers/plugin"] == (130.0, None)
