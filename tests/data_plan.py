"""Reading a Ray Dataset's logical plan as built, before anything runs (test helper)."""

from __future__ import annotations

from typing import Any


def remote_args_by_op(ds: Any) -> dict[str, dict[str, Any]]:
    """Operator name -> its Ray remote arguments (empty for a source without them), along the plan's chain."""
    ops, op = {}, ds._logical_plan.dag
    while op is not None:
        ops[op.name] = getattr(op, "ray_remote_args", {})
        op = op.input_dependencies[0] if op.input_dependencies else None
    return ops
