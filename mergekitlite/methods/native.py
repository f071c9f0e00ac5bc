"""The fused native kernel for ``LinearForm`` methods (``mergekitlite/_native.c``), when it is built.

The kernel reads the inputs' raw bytes (bf16, fp16 or float32), computes the form in float32 with
the same operations in the same order as ``linear_form.evaluate`` and writes the output's raw bytes
(bf16, fp16 or float32): the same bits as the torch path, in one pass over memory instead of about
eight. It counts the NaN/±inf values it reads and writes on the way (``mergekitlite.nonfinite``).
It is optional: ``pip install`` builds it when a C compiler is present, and without it
``available()`` is False and merges run on torch alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from mergekitlite.io.safetensors_header import itemsize
from mergekitlite.methods.linear_form import LinearForm

ABI_VERSION = 3  # must equal _native.c's; a stale build (an old .so next to newer code) is not used
MAX_INPUTS = 256
CODES = {"F32": 0, "BF16": 1, "F16": 2}  # safetensors dtype code -> _native.c's enum


def load_extension(name: str, abi: int) -> ModuleType | None:
    """The optional native extension ``mergekitlite.<name>``, or None when it is not built or is stale (an old
    build next to newer code: its ABI_VERSION differs from ``abi``)."""
    try:
        module = importlib.import_module(f"mergekitlite.{name}")
    except ImportError:
        return None
    return module if getattr(module, "ABI_VERSION", None) == abi else None


_KERNEL = load_extension("_native", ABI_VERSION)


def available() -> bool:
    return _KERNEL is not None


def supports(in_codes: Sequence[str], out_code: str) -> bool:
    """Whether the kernel handles these safetensors dtype codes (float32 compute only)."""
    return available() and len(in_codes) <= MAX_INPUTS and out_code in CODES and all(c in CODES for c in in_codes)


def raw_buffer(buf: Any) -> tuple[int, int]:
    """(address, bytes) of a contiguous uint8 CPU buffer: a numpy array (what the executor reads into) or a
    torch tensor. Anything else is refused: the kernel reads and writes raw memory."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
            raise ValueError(f"native buffers must be contiguous uint8 arrays, not {buf.dtype}")
        return buf.ctypes.data, buf.nbytes
    dtype, device = str(getattr(buf, "dtype", "")), str(getattr(buf, "device", ""))
    if dtype != "torch.uint8" or device != "cpu" or not buf.is_contiguous():
        raise ValueError(f"native buffers must be contiguous uint8 CPU tensors, not {dtype} on {device}")
    return buf.data_ptr(), buf.numel()


def run_linear(
    form: LinearForm, inputs: Sequence[Any], in_codes: Sequence[str], out: Any, out_code: str
) -> tuple[tuple[int, ...], int, int]:
    """``out`` ← the form over ``inputs``, all contiguous uint8 CPU buffers (numpy arrays or torch tensors)
    holding raw values of the given codes (the same number of elements each). Releases the GIL while it runs.
    Returns the NaN/±inf counts: (per input, in the output, in the output but finite before the cast)."""
    if _KERNEL is None:
        raise RuntimeError("the native kernel is not built (reinstall mergekitlite with a C compiler)")
    out_addr, out_bytes = raw_buffer(out)
    n = out_bytes // itemsize(out_code)
    addresses = []
    for buf, code in zip(inputs, in_codes):
        addr, nbytes = raw_buffer(buf)
        if nbytes != n * itemsize(code):
            raise ValueError(f"native input of {nbytes} bytes for {n} {code} values")
        addresses.append(addr)
    found: tuple[tuple[int, ...], int, int] = _KERNEL.linear(
        out_addr,
        CODES[out_code],
        n,
        addresses,
        [CODES[c] for c in in_codes],
        form.terms,
        form.weights,
        -1 if form.subtract is None else form.subtract,
        form.divisor,
        form.scale,
        -1 if form.anchor is None else form.anchor,
        form.anchor_weight,
    )
    return found
