"""``parse_pattern``: build a pattern from text such as ``"SlidingWindow(64) & Causal()"``.

A safe, tiny grammar (no ``eval``): calls of pattern classes with literal arguments
(ints, strings, tuples/lists of those, ``range(...)``), combined with ``&``, ``|`` and
parentheses.
"""

from __future__ import annotations

import ast

from .base import Pattern
from .basic import Causal, Full
from .document import Document, KeyPadding
from .global_tokens import Global
from .layout import BlockLayout
from .random_blocks import Random
from .strided import Fixed, Strided
from .window import Dilated, SlidingWindow

__all__ = ["PATTERN_TYPES", "parse_pattern"]

#: The pattern classes an expression may name.
PATTERN_TYPES = (
    Full,
    Causal,
    SlidingWindow,
    Dilated,
    Strided,
    Fixed,
    Global,
    Random,
    BlockLayout,
    Document,
    KeyPadding,
)


def _registry() -> dict[str, type[Pattern]]:
    return {cls.__name__: cls for cls in PATTERN_TYPES}


def parse_pattern(spec: str) -> Pattern:
    """Parse a pattern expression.

    Example:
        >>> parse_pattern("SlidingWindow(64) & Causal()")
        SlidingWindow(before=64) & Causal()

    Raises:
        ValueError: The text is not a pattern expression; the message says what is allowed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"parse_pattern: expected a non-empty string, but got {spec!r}.")
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"parse_pattern: could not parse {spec!r}: {e.msg}.") from None
    return _build(tree.body, spec)


def _fail(spec: str, what: str) -> ValueError:
    names = ", ".join(sorted(_registry()))
    return ValueError(
        f"parse_pattern: {what} in {spec!r}. Expected pattern calls ({names}) with literal "
        f"arguments, combined with & and |."
    )


def _build(node: ast.AST, spec: str) -> Pattern:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        left, right = _build(node.left, spec), _build(node.right, spec)
        return left & right if isinstance(node.op, ast.BitAnd) else left | right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "PerHead":
        from .per_head import PerHead

        if len(node.args) != 1 or node.keywords:
            raise _fail(spec, "PerHead takes one list of patterns")
        return PerHead(_heads(node.args[0], spec))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        cls = _registry().get(node.func.id)
        if cls is None:
            raise _fail(spec, f"unknown pattern {node.func.id!r}")
        args = [_literal(a, spec) for a in node.args]
        kwargs = {kw.arg: _literal(kw.value, spec) for kw in node.keywords if kw.arg}
        try:
            return cls(*args, **kwargs)
        except TypeError as e:
            raise ValueError(f"parse_pattern: bad arguments for {node.func.id}: {e}.") from None
    raise _fail(spec, f"unexpected {type(node).__name__!r}")


def _heads(node: ast.AST, spec: str) -> list[Pattern]:
    """PerHead's argument: ``[a, b, ...]``, ``[a] * 3``, their sums, or one pattern (as its
    ``repr`` writes runs: ``PerHead([a] * 2 + [b])``)."""
    if isinstance(node, ast.List):
        return [_build(e, spec) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _heads(node.left, spec) + _heads(node.right, spec)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        count = _literal(node.right, spec)
        if not isinstance(count, int) or count < 1:
            raise _fail(spec, f"expected a positive repeat count, got {ast.unparse(node.right)!r}")
        return _heads(node.left, spec) * count
    return [_build(node, spec)]


def _literal(node: ast.AST, spec: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand, spec)
        if isinstance(value, int):
            return -value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, spec) for e in node.elts)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        args = [_literal(a, spec) for a in node.args]
        if all(isinstance(a, int) for a in args) and 1 <= len(args) <= 3:
            return range(*args)
    raise _fail(spec, f"unsupported argument {ast.unparse(node)!r}")
