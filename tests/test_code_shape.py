"""The engine stays readable: no function in pipelines/ over 80 lines or 10 parameters.

Exempt are the signatures users and diffusers call by keyword, kept explicit as diffusers' own models and pipelines
keep them: a registered config's ``__init__``, the transformer's ``forward`` and the pipeline's ``__call__`` /
``stream`` (each of which packs its arguments into one request or options object at once).
"""

import ast
from pathlib import Path

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
EXEMPT = {
    ("transformer_causal_wan.py", "__init__"),
    ("transformer_causal_wan.py", "forward"),
    ("pipeline_one_forcing.py", "__call__"),
    ("pipeline_one_forcing.py", "stream"),
}


def _functions():
    for path in sorted(PIPELINES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def _parameters(node) -> int:
    args = node.args
    return len(args.posonlyargs + args.args + args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)


def test_no_long_functions_and_no_long_signatures():
    too_long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                for name, node in _functions() if node.end_lineno - node.lineno + 1 > 80]
    too_wide = [f"{name}:{node.lineno} {node.name} ({_parameters(node)} parameters)"
                for name, node in _functions() if _parameters(node) > 10 and (name, node.name) not in EXEMPT]
    assert not too_long and not too_wide, too_long + too_wide


def test_the_check_sees_the_engine():
    names = {(name, node.name) for name, node in _functions()}
    assert EXEMPT <= names and ("session.py", "next_block") in names and ("layout.py", "block_after") in names
