"""mergekit-yaml's command-line options on ``merge``, so that a command copied from a model card runs
unchanged: those with an equivalent do what mergekit does, those that need nothing here say so in a
note, and those with no equivalent are refused with what to do instead."""

from __future__ import annotations

import argparse
from typing import Any

from mergekitlite.cli.flags import count_arg
from mergekitlite.errors import MergekitliteError
from mergekitlite.options import MERGEKIT_GROUP

# Options that need nothing here, and why.
MERGEKIT_NO_OPS = {
    "allow_crimes": "tensors are matched by name and shape; there is no architecture check to override",
    "lazy_unpickle": ".bin inputs are always read lazily",
    "low_cpu_memory": "memory is bounded by --max-ram / --max-vram",
    "read_to_gpu": "chunks are read on the host and computed on --device",
    "multi_gpu": "one device computes (--device)",
    "async_write": "writing always overlaps the arithmetic",
    "clone_tensors": "every output tensor is written from its own bytes",
    "safe_serialization": "the output is always safetensors",
    "trust_remote_code": "merging runs no model code",
    "write_model_card": "the model card (recipe, input hashes) is always written",
}
# Options that take a value and need nothing here, and why.
MERGEKIT_NO_OP_VALUES = {
    "lora_merge_cache": "model+adapter inputs are applied while streaming; no merged copy of the model is written",
    "lora_merge_dtype": "model+adapter inputs are applied in float32 (W + s·B·A, exact to float32) and rounded once "
    "to the output dtype",
}
# ... and those that have no equivalent, with what to do instead.
MERGEKIT_UNSUPPORTED = {
    "transformers_cache": "set HF_HUB_CACHE=DIR instead",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_mergekit_group(p: argparse.ArgumentParser) -> Any:
    """The group of mergekit-yaml's options; the declared options of that group (--out-shard-size,
    --no-copy-tokenizer) are added to it by ``add_option_flags``."""
    quiet_ones = ", ".join(_flag(d) for d in MERGEKIT_NO_OPS)
    g = p.add_argument_group(
        MERGEKIT_GROUP,
        f"accepted so that mergekit commands run unchanged; {quiet_ones} and -v are accepted too and change nothing",
    )
    g.add_argument("--cuda", action="store_true", help="same as --device cuda")
    g.add_argument("--gpu-rich", action="store_true", help="same as --device cuda")
    g.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True, help="(default)")
    g.add_argument("--num-threads", type=count_arg, metavar="N", help="same as -j")
    g.add_argument("--write-threads", type=int, metavar="N", help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    for dest in MERGEKIT_NO_OPS:
        g.add_argument(_flag(dest), dest=dest, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--no-write-model-card", dest="write_model_card", action="store_true", help=argparse.SUPPRESS)
    for dest in (*MERGEKIT_NO_OP_VALUES, *MERGEKIT_UNSUPPORTED):
        g.add_argument(_flag(dest), dest=dest, metavar="X", help=argparse.SUPPRESS)
    return g


def mergekit_notes(args: argparse.Namespace) -> list[str]:
    """One line per mergekit-yaml option given that changes nothing here."""
    flags = [(dest, why) for dest, why in MERGEKIT_NO_OPS.items() if getattr(args, dest)]
    flags += [(dest, why) for dest, why in MERGEKIT_NO_OP_VALUES.items() if getattr(args, dest) is not None]
    return [f"{_flag(dest)} has no effect: {why}" for dest, why in flags]


def apply_mergekit_flags(args: argparse.Namespace, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (MergeOptions fields from the declared flags) with mergekit's spellings applied;
    a refused option is an error naming what to do instead."""
    for dest, instead in MERGEKIT_UNSUPPORTED.items():
        if getattr(args, dest) is not None:
            raise MergekitliteError(f"{_flag(dest)} (a mergekit-yaml option): {instead}")
    out = dict(values)
    if (args.cuda or args.gpu_rich) and out["device"] == "cpu":
        out["device"] = "cuda"
    out["threads"] = out["threads"] or args.num_threads
    return out
