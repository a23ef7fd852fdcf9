"""Limits every module of planer keeps: short functions with few parameters, so each holds one idea.

Parameters are those a caller passes: ``self`` and ``cls`` are not counted, nor ``ctx``, the context autograd
passes to a ``torch.autograd.Function``'s forward and backward in place of ``self``.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "planer"
MODULES = sorted(path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py"))
MAX_PARAMETERS, MAX_LINES = 8, 60


def test_every_module_is_checked():
    assert {"cli.py", "config.py", "models/moe.py", "models/txl/model.py", "search/knapsack.py"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_functions_are_short_and_take_few_parameters(module):
    tree = ast.parse((SRC / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls", "ctx")]
            params += [p for p in (a.vararg, a.kwarg) if p is not None]
            assert len(params) <= MAX_PARAMETERS, f"{module}:{node.name} takes {len(params)} parameters"
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_LINES, f"{module}:{node.name} is {length} lines long"
