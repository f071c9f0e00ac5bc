"""A model tensor as an adapter changes it, described from headers alone.

``AdaptedTensor`` is a ``TensorInfo``, so everything that plans with tensors (shapes, dtypes, row sizes,
inputs of a task) sees an ordinary input; only the readers (``lora.rows.read_rows``) know that its bytes
are produced on read. Being a ``TensorInfo`` subclass, it travels with every ``InputRef`` made from a
model's tensors: no planning step can drop the adapter by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekitlite.io.safetensors_header import TensorInfo, itemsize

LINEAR = "linear"  # ΔW = s · B · A            (nn.Linear: W [out, in], A [r, in], B [out, r])
TRANSPOSED = "transposed"  # ΔW = s · (B · A)ᵀ  (nn.Embedding: A [r, rows], B [cols, r]; Conv1D with fan_in_fan_out)
BIAS = "bias"  # Δb = s · lora_B.bias           (lora_bias: true)


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA's contribution to a tensor: ``kind`` says how ``a`` and ``b`` combine (see above)."""

    module: str  # the module path in the model, e.g. model.layers.0.self_attn.q_proj
    kind: str
    a: TensorInfo | None  # None for BIAS
    b: TensorInfo
    scale: float  # lora_alpha / r (or / √r with use_rslora), as PEFT computes it
    rank: int

    @property
    def row_factor(self) -> TensorInfo:
        """The factor whose rows (LINEAR) or columns (TRANSPOSED) follow the tensor's rows."""
        assert self.a is not None
        return self.b if self.kind == LINEAR else self.a

    @property
    def whole_factor(self) -> TensorInfo:
        """The factor every row needs whole: A [r, cols] (LINEAR) or B [cols, r] (TRANSPOSED)."""
        assert self.a is not None
        return self.a if self.kind == LINEAR else self.b

    def whole_bytes(self) -> int:
        """float32 bytes of the whole factor, held while a chunk of the tensor is produced."""
        return 0 if self.kind == BIAS else self.whole_factor.numel * 4

    def row_bytes(self) -> int:
        """Bytes per tensor row of the row factor: as stored and as float32."""
        if self.kind == BIAS:
            return itemsize(self.b.dtype) + 4
        return self.rank * (itemsize(self.row_factor.dtype) + 4)


@dataclass(frozen=True)
class AdaptedTensor(TensorInfo):
    """A tensor of ``model+adapter``. With ``factors``: its value is W + Σ s·ΔW in float32 (dtype F32, the
    bytes computed on read), W read from ``base`` (the model's tensor, or a ``base_layer`` the adapter
    saved). Without: a full replacement from the adapter (``modules_to_save``), read as it is stored.
    ``model_dtype`` is the dtype the model stores the tensor in: the output keeps it unless the recipe
    sets ``dtype``."""

    model_dtype: str = "F32"
    base: TensorInfo | None = None
    factors: tuple[LoraFactor, ...] = ()
    adapter: str = ""  # the adapter's reference, for messages

    @property
    def computed(self) -> bool:
        return bool(self.factors)

    def parts(self) -> tuple[TensorInfo, ...]:
        """Every stored tensor this one is made from."""
        if not self.factors:
            return (self,)
        assert self.base is not None
        out: list[TensorInfo] = [self.base]
        for f in self.factors:
            out += [t for t in (f.a, f.b) if t is not None]
        return tuple(out)

    def identity(self) -> str:
        """Identifies the arithmetic (kinds and scales) for plan fingerprints; files are stat'ed separately."""
        return repr([(f.module, f.kind, f.scale, f.rank) for f in self.factors])

    def extra_row_bytes(self) -> int:
        """Working bytes per row besides the float32 row itself: the stored W row, the accumulator and
        the product of one rank step (float32), and each factor's row factor (stored and float32)."""
        if not self.factors:
            return 0
        assert self.base is not None
        cols = self.numel // self.shape[0] if self.shape and self.shape[0] else self.numel
        return self.base.row_bytes + 2 * 4 * cols + sum(f.row_bytes() for f in self.factors)

    def fixed_bytes(self) -> int:
        """Bytes held per chunk regardless of its rows: each factor's whole factor in float32 and as stored."""
        return sum(f.whole_bytes() + (f.whole_factor.nbytes if f.kind != BIAS else 0) for f in self.factors)


def model_dtype(info: TensorInfo) -> str:
    """The dtype the model stores ``info`` in (an adapted tensor's effective dtype is float32)."""
    return info.model_dtype if isinstance(info, AdaptedTensor) else info.dtype


def adapted(base: TensorInfo, factors: tuple[LoraFactor, ...], adapter: str) -> AdaptedTensor:
    """``base`` with LoRA factors: float32, the same shape; ``file``/``begin`` are the base's (for ordering)."""
    nbytes = base.numel * 4
    return AdaptedTensor(
        base.name, base.file, "F32", base.shape, base.begin, base.begin + nbytes, base.dtype, base, factors, adapter
    )


def replaced(name: str, stored: TensorInfo, model_dtype_: str, adapter: str) -> AdaptedTensor:
    """The adapter's full copy ``stored`` in place of the model's tensor ``name``."""
    return AdaptedTensor(
        name, stored.file, stored.dtype, stored.shape, stored.begin, stored.end, model_dtype_, None, (), adapter
    )
