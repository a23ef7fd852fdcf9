"""Limits the training machinery keeps: short functions with few parameters, so each holds one idea."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "planer"


@pytest.mark.parametrize(
    "module",
    ["training/train.py", "search/gumbel.py", "training/loop.py", "training/step.py", "search/knapsack.py",
     "search/methods.py", "search/option_cache.py", "io/records.py", "pipeline.py", "report/rows.py"],
)  # fmt: skip
def test_functions_are_short_and_take_few_parameters(module):
    tree = ast.parse((SRC / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            params += [p for p in (a.vararg, a.kwarg) if p is not None]
            assert len(params) <= 8, f"{module}:{node.name} takes {len(params)} parameters"
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{module}:{node.name} is {length} lines long"
