"""NaN and ±inf met while merging: counted per output tensor, reported, recorded, refused by ``--strict``.

Every kernel counts in the pass that does the work (the native kernels while they load and store
blocks, the torch path on tensors already in memory) and returns, per chunk, what it found: the
non-finite input values it read, the non-finite values it wrote after the cast to the output dtype,
and how many of those were finite before the cast (an overflow, e.g. float32 70000 → fp16 inf). The
executor sums the chunks of a tensor; the resume journal keeps the sums of finished tensors, so a
resumed merge reports them too; the provenance file records them; and ``--strict`` refuses to
finalise an output that holds a non-finite value.

A kernel (native or not) plugs in by returning ``(nonfinite_in, nonfinite_out, overflow)`` for its
chunk, ``nonfinite_in`` a total or one count per input in the task's input order; the executor turns
it into a ``NonFinite`` with ``NonFinite.from_kernel(counts, [ref.model for ref in task.inputs])``.
The linear kernel may skip counting a block whose result is finite (NaN/inf propagate through its
every step); a kernel that masks values (ties, DARE) may not, and counts its inputs.

No torch here: the journal and the report use it without the arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Warning lines printed after a merge; the rest are summed up in one more line.
REPORT_LIMIT = 10


@dataclass(frozen=True)
class NonFinite:
    """What one chunk (or a whole tensor) held. ``by_model``: ``inputs`` split by the model they were
    read from, when the kernel tells them apart (a model listed twice is summed); empty otherwise."""

    inputs: int = 0
    outputs: int = 0
    overflow: int = 0
    by_model: Mapping[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)

    def __add__(self, other: NonFinite) -> NonFinite:
        models = dict(self.by_model)
        for model, n in other.by_model.items():
            models[model] = models.get(model, 0) + n
        return NonFinite(
            self.inputs + other.inputs, self.outputs + other.outputs, self.overflow + other.overflow, models
        )

    @classmethod
    def from_kernel(cls, counts: Sequence[Any], models: Sequence[str] | None = None) -> NonFinite:
        """A kernel's ``(nonfinite_in, nonfinite_out, overflow)`` for one chunk. ``nonfinite_in`` is a
        total, or one count per input (in the task's input order, named by ``models``)."""
        found, outputs, overflow = counts
        if not outputs and (not found if isinstance(found, int) else not any(found)):
            return _NOTHING  # the common case, per chunk: no allocation, no loop
        if isinstance(found, int):
            return cls(found, int(outputs), int(overflow))
        per_input = [int(n) for n in found]
        by_model: dict[str, int] = {}
        if models is not None:
            if len(models) != len(per_input):
                raise ValueError(f"{len(per_input)} input counts for {len(models)} inputs")
            for model, n in zip(models, per_input):
                if n:
                    by_model[model] = by_model.get(model, 0) + n
        return cls(sum(per_input), int(outputs), int(overflow), by_model)

    @property
    def fatal(self) -> bool:
        """What ``--strict`` refuses: a non-finite output value (an overflow on the cast is one)."""
        return self.outputs > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "nonfinite_inputs": self.inputs,
            "nonfinite_outputs": self.outputs,
            "overflow_on_cast": self.overflow,
            "by_model": dict(self.by_model),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NonFinite:
        by_model = data.get("by_model") or {}
        return cls(
            int(data.get("nonfinite_inputs", 0)),
            int(data.get("nonfinite_outputs", 0)),
            int(data.get("overflow_on_cast", 0)),
            {str(k): int(v) for k, v in by_model.items()},
        )


_NOTHING = NonFinite(by_model=MappingProxyType({}))  # read-only: shared by every chunk that met no NaN/±inf


def describe(name: str, found: NonFinite, paths: Mapping[str, str], out_dtype: str | None = None) -> str:
    """One line about one tensor: its counts, and the input models (by path) that held NaN/inf."""
    parts = []
    if found.outputs:
        cast = f" after the cast to {out_dtype}" if out_dtype else ""
        over = f" ({found.overflow} of them finite before the cast: overflow)" if found.overflow else ""
        parts.append(f"{found.outputs} NaN/inf output value(s){cast}{over}")
    if found.inputs:
        where = ", ".join(f"{paths.get(m, m)} ({n})" for m, n in sorted(found.by_model.items()))
        parts.append(f"{found.inputs} NaN/inf input value(s)" + (f" in {where}" if where else ""))
    if not found.outputs:
        parts.append("the merge masked them (the output is finite)")
    return f"tensor {name}: " + "; ".join(parts)


def report_lines(
    found: Mapping[str, NonFinite],
    order: Sequence[str],
    paths: Mapping[str, str],
    dtypes: Mapping[str, str] | None = None,
    limit: int = REPORT_LIMIT,
) -> list[str]:
    """Warning lines, one per affected tensor in ``order`` (the plan's), the first ``limit`` of them."""
    names = [n for n in order if found.get(n)]
    lines = [describe(n, found[n], paths, (dtypes or {}).get(n)) for n in names[:limit]]
    if len(names) > limit:
        lines.append(f"and {len(names) - limit} more tensors with NaN/inf values (all in mergekitlite.json)")
    return lines


def strict_problem(
    found: Mapping[str, NonFinite],
    order: Sequence[str],
    paths: Mapping[str, str],
    dtypes: Mapping[str, str] | None = None,
) -> str | None:
    """``--strict``'s one line about the first tensor whose output holds NaN/inf, or None."""
    bad = [n for n in order if n in found and found[n].fatal]
    if not bad:
        return None
    name, first = bad[0], found[bad[0]]
    dtype = (dtypes or {}).get(name)
    what = describe(name, first, paths, dtype)
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    if first.overflow:
        fix = "use `dtype: float32` or `dtype: bfloat16` in the recipe (the values exceed the output dtype's range)"
    else:
        fix = "check the inputs named above" if first.by_model else "check the inputs of this tensor"
    if first.overflow and first.by_model:
        fix += ", and check the inputs named above"
    return f"--strict: {what}{more}; {fix}, or merge without --strict to accept it"
