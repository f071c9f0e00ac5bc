"""The task graph the planner makes and the executor runs: one ``TensorTask`` per output tensor,
its inputs (``InputRef``), the row rules applied after the merge (``RowRule``), and the ``Plan``
that holds them with the shard layout, donors and memory budget."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergekitlite.budget import BASELINE_RSS, Budget, RowCost, row_cost
from mergekitlite.io.safetensors_header import CODE_BY_NAME, ShardLayout, TensorInfo, itemsize
from mergekitlite.lora.tensor import AdaptedTensor
from mergekitlite.methods import get_method
from mergekitlite.recipe import LoadedRecipe, Recipe
from mergekitlite.sources import ModelSource


@dataclass(frozen=True)
class RowSource:
    """Where each row of an input comes from when its rows are not simply its own rows in order: the
    embedding and output head of a model whose vocabulary differs from the output's (rows found by token
    text, mergekit's rules for tokens it lacks). Row ``r`` of the input is ``refs[index[r]]``'s row
    ``row[r]``, or (``index[r]``) ``ZERO``, ``MEAN`` (the float64 mean of the rows ``means[r]`` lists, as
    (ref, row) pairs) or ``PAD`` (the mean of rows 0..``real_rows``−1 of this input as gathered). Rows are
    read in the dtype of ``refs[0]`` (the input's own tensor); other tensors' rows are cast to it once."""

    ZERO = -1
    MEAN = -2
    PAD = -3

    refs: tuple[InputRef, ...]
    index: Any = field(compare=False, repr=False)  # numpy int16 [rows]
    row: Any = field(compare=False, repr=False)  # numpy int64 [rows]
    means: Mapping[int, tuple[tuple[int, int], ...]] = field(compare=False, repr=False)
    real_rows: int
    digest: str  # identifies the mapping (fingerprints, equality)


@dataclass(frozen=True)
class InputRef:
    model: str
    tensor: TensorInfo
    rows: RowSource | None = None  # set when the rows are gathered (see RowSource)

    @property
    def files(self) -> tuple[InputRef, ...]:
        """Every plain tensor this input reads from (a LoRA'd tensor's model weight and factors too)."""
        refs = (self,) if self.rows is None else self.rows.refs
        return tuple(InputRef(r.model, part) for r in refs for part in _parts(r.tensor))

    @property
    def adapted(self) -> tuple[AdaptedTensor, ...]:
        """The tensors among this input's whose rows are computed on read (model+adapter inputs)."""
        refs = (self,) if self.rows is None else self.rows.refs
        return tuple(r.tensor for r in refs if isinstance(r.tensor, AdaptedTensor) and r.tensor.computed)


def _parts(info: TensorInfo) -> tuple[TensorInfo, ...]:
    return info.parts() if isinstance(info, AdaptedTensor) else (info,)


@dataclass(frozen=True)
class RowRule:
    """Output rows [start, end) set by a simple rule instead of the method: special-token rows
    taken from a model or zeroed, and rows that exist in only some inputs' vocabularies."""

    start: int
    end: int
    kind: str  # "take" | "mean" | "zero"
    sources: tuple[InputRef, ...] = ()
    src_start: int | None = None  # first source row for "take" (default: ``start``)
    why: str = ""


@dataclass(frozen=True)
class TensorTask:
    """How to produce one output tensor."""

    name: str
    method: str
    base: InputRef | None
    models: tuple[InputRef, ...]
    params: tuple[tuple[str, Any], ...]  # per-model parameters are tuples aligned with ``models``
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    layer: int | None
    t: float
    why: str = ""  # set when the tensor is not merged by the recipe's method
    chunk_rows: int = 1  # rows merged at a time (set from the memory budget)
    seed: int = 0  # per-tensor seed for random methods
    merge_rows: int | None = None  # rows merged by the method (fewer when vocabularies differ)
    row_rules: tuple[RowRule, ...] = ()  # applied after the merge, in order

    @classmethod
    def copy(cls, name: str, src: InputRef, out_dtype: str, layer: int | None, t: float, why: str) -> TensorTask:
        """The tensor of ``src``, unchanged (or only cast to ``out_dtype``)."""
        return cls(name, "passthrough", None, (src,), (("scale", (None,)),), src.tensor.shape, out_dtype, layer, t, why)

    @property
    def inputs(self) -> tuple[InputRef, ...]:
        return ((self.base,) if self.base else ()) + self.models

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.out_dtype)

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def copy_of(self) -> InputRef | None:
        """The input whose bytes are the output, when the task is a plain copy."""
        if self.method != "passthrough" or self.base is not None or len(self.models) != 1:
            return None
        src = self.models[0]
        if self.param_dict.get("scale", (None,))[0] is not None or src.tensor.dtype != self.out_dtype:
            return None
        return src

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def merged_rows(self) -> int:
        return self.rows if self.merge_rows is None else self.merge_rows

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    def row_cost(self, compute_dtype: str, on_gpu: bool) -> RowCost:
        adapted = [t for i in self.inputs for t in i.adapted]
        return row_cost(
            [i.tensor.row_bytes for i in self.inputs],
            self.row_elements,
            self.row_elements * itemsize(self.out_dtype),
            itemsize(CODE_BY_NAME[compute_dtype]),
            on_gpu,
            get_method(self.method).temporaries(len(self.models)),
            produced=sum(t.extra_row_bytes() for t in adapted),
            fixed=sum(t.fixed_bytes() for t in adapted),
        )


@dataclass(frozen=True)
class Plan:
    loaded: LoadedRecipe
    sources: Mapping[str, ModelSource]
    tasks: tuple[TensorTask, ...]
    shards: tuple[ShardLayout, ...]
    shard_of: Mapping[str, str]
    compute_dtype: str
    config_donor: str
    tokenizer_donor: str
    out_config: Mapping[str, Any]
    budget: Budget
    random_seed: int
    warnings: tuple[str, ...] = ()
    vocab: Any = None  # plan.vocab.OutputVocab when rows are found by token text (and the tokenizer it needs)

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def bytes_read(self) -> int:
        return sum(i.tensor.nbytes for t in self.tasks for i in t.inputs)

    def task_working_set(self, task: TensorTask) -> tuple[int, int]:
        """(host bytes, device bytes) held while merging ``task`` (see budget.py)."""
        cost = task.row_cost(self.compute_dtype, self.budget.on_gpu)
        rows = task.chunk_rows
        return self.budget.inflight * (cost.host * rows + cost.fixed), self.budget.workers * cost.device * rows

    def estimated_peak(self) -> int:
        """Estimated peak resident memory of the whole process: interpreter and torch plus the
        largest task's working set."""
        return BASELINE_RSS + max((self.task_working_set(t)[0] for t in self.tasks), default=0)

    def estimated_peak_vram(self) -> int:
        return max((self.task_working_set(t)[1] for t in self.tasks), default=0)

    def fingerprint(self) -> str:
        """Identifies the plan and its inputs: a resume is only allowed into a matching partial output."""
        h = hashlib.sha256()
        h.update(f"{self.compute_dtype}:{self.random_seed}".encode())
        stats = {}  # one stat per input file, not one per tensor read from it
        for t in self.tasks:
            for i in (f for ref in t.inputs for f in ref.files):
                if i.tensor.file not in stats:
                    st = i.tensor.file.stat()
                    stats[i.tensor.file] = f"{st.st_size}:{st.st_mtime_ns}"
        for t in self.tasks:
            h.update(json.dumps([t.name, t.method, t.out_dtype, list(t.shape), repr(t.params), t.merge_rows]).encode())
            h.update(
                repr(
                    [
                        (r.start, r.end, r.kind, r.src_start, [(i.model, i.tensor.name) for i in r.sources])
                        for r in t.row_rules
                    ]
                ).encode()
            )
            for ref in t.inputs:
                if ref.rows is not None:
                    h.update(ref.rows.digest.encode())
                for adapted in ref.adapted:
                    h.update(adapted.identity().encode())
                for i in ref.files:
                    h.update(f"{i.tensor.file}:{stats[i.tensor.file]}:{i.tensor.begin}".encode())
        for s in self.shards:
            h.update(s.header)
        return h.hexdigest()
