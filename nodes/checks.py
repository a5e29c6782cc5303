"""Checks that run when a prompt is queued (ComfyUI calls a node's `validate_inputs` at POST /prompt, before
anything executes), so a bad value is refused before a checkpoint loads or a step trains.

ComfyUI skips its own type and min/max checks for every input a node's `validate_inputs` names, and it lets
NaN through those checks anyway (NaN is neither smaller nor larger than anything): `numbers_problem` checks
finiteness and the schema's bounds itself. A linked input arrives as None here (its value is not known until
the node upstream runs) and is checked when the node executes.
"""
from __future__ import annotations

import math

from ..trainers.config import quoted


def _inputs(node_cls) -> dict:
    # define_schema, not GET_SCHEMA: ComfyUI validates on a locked clone of the class that GET_SCHEMA would write to
    return {i.id: i for i in node_cls.define_schema().inputs}


def numbers_problem(node_cls, **values) -> str | None:
    """The first number input of `node_cls` that is not finite or lies outside its schema's min / max."""
    inputs = _inputs(node_cls)
    for name, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        spec = inputs.get(name)
        low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if low is not None and value < low:
            return f"{name} must be at least {low}, got {quoted(value)}"
        if high is not None and value > high:
            return f"{name} must be at most {high}, got {quoted(value)}"
    return None


def verdict(*problems: str | None) -> bool | str:
    """What `validate_inputs` returns: True, or the first problem (ComfyUI shows it under the node)."""
    for problem in problems:
        if problem:
            return problem
    return True


def guarded(check) -> str | None:
    """Run a check that raises ValueError (PathError, ConfigError) for a bad value; its message is the verdict."""
    try:
        check()
    except ValueError as e:
        return str(e)
    return None
