"""Sub-commands that look at models rather than merge them: eval, diff, inspect.

``add_commands`` registers them on ``mergekitlite``'s parser; each handler takes
``(args, console)`` and returns an exit code, like the merge commands in cli.py. The modules that
do the work import torch and transformers, so they are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from mergekitlite.budget import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _eval(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.evaluate import cmd_eval

    return cmd_eval(args, console)


def _diff(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.diff import cmd_diff

    return cmd_diff(args, console)


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.inspect_model import cmd_inspect

    return cmd_inspect(args, console)


def _add_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "eval",
        help="measure a merged model next to its parents: perplexity, end-of-turn behaviour, KL",
        description=(
            "Measure a merged model and each parent side by side, on the same token ids: perplexity of a text "
            "file (sliding windows), how often a greedy answer to each prompt ends with the model's stop token, "
            "the probability of the end-of-turn token right after each reference answer, KL(merged ‖ parent) of "
            "next-token distributions, and the first generations. Models are loaded one at a time."
        ),
    )
    p.add_argument("out", help="the merged model (folder or hub id)")
    p.add_argument("--against", nargs="+", default=[], metavar="MODEL", help="parents to compare with")
    p.add_argument(
        "--text", type=Path, metavar="FILE", help="UTF-8 text file for perplexity and KL (without it both are skipped)"
    )
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="YAML list of {prompt, reference} (default: the packaged Japanese+English set)",
    )
    p.add_argument("--max-prompts", type=_positive, metavar="N", help="use only the first N prompts")
    p.add_argument(
        "--chat-template-from",
        metavar="MODEL",
        help="model folder, .jinja file or built-in template name whose chat template renders the prompts "
        "(default: the merged model's, else the first parent's that has one)",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive, default=256, metavar="N", help="generation limit per prompt (default 256)"
    )
    p.add_argument(
        "--max-length",
        type=_positive,
        metavar="N",
        help="perplexity window in tokens (default: the models' context, at most 2048)",
    )
    p.add_argument(
        "--stride",
        type=_positive,
        metavar="N",
        help="window step in tokens, less than the window (default: half the window)",
    )
    p.add_argument("--max-text-tokens", type=_positive, metavar="N", help="score only the first N tokens of --text")
    p.add_argument(
        "--kl-tokens",
        type=_positive,
        default=512,
        metavar="N",
        help="text positions the KL is averaged over (default 512; memory: N × vocab floats)",
    )
    p.add_argument("--show", type=int, default=3, metavar="N", help="generations shown side by side (default 3)")
    p.add_argument(
        "--show-chars", type=_positive, default=200, metavar="N", help="characters shown per generation (default 200)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, cuda:N, mps, or auto (accelerate places layers on GPU, CPU and disk)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype when loading (default: the checkpoint's)",
    )
    p.add_argument(
        "--max-ram", type=_size, metavar="SIZE", help="RAM for weights, e.g. 24GB; the rest is offloaded to disk"
    )
    p.add_argument(
        "--max-vram",
        type=_size,
        metavar="SIZE",
        help="GPU memory for weights, e.g. 7GB; the rest stays in RAM or on disk",
    )
    p.add_argument(
        "--offload-folder", type=Path, metavar="DIR", help="where offloaded weights go (default: a temporary folder)"
    )
    p.add_argument(
        "-j",
        "--threads",
        type=_positive,
        metavar="N",
        help="CPU threads for the forward passes (default: 1 for models under 100M parameters, where a thread "
        "pool only slows a busy machine down; else torch's choice)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models that ship their own Python code (Qwen-14B) to run it",
    )
    p.add_argument(
        "--report", type=Path, metavar="PATH", help="write PATH.md and PATH.json (or only PATH if it ends in .md/.json)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.set_defaults(handler=_eval)


def _add_diff(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "diff",
        help="relative weight differences per layer and module (to choose per-layer merge weights)",
        description=(
            "Per layer and module: ‖A − B‖/‖B‖, or with --base how far each model moved from the base "
            "(‖A − base‖/‖base‖, ‖B − base‖/‖base‖) and the cosine between the two moves. Where a fine-tune moved "
            "the weights most, or where two fine-tunes pull in opposite directions (cosine < 0), is where a "
            "recipe's per-layer weight gradient (e.g. weight: [0.2, 0.5, 1.0]) matters. Tensors are streamed in "
            "row chunks: a 14B model needs only a few tens of MB."
        ),
    )
    p.add_argument("a", help="model A (folder or hub id)")
    p.add_argument("b", help="model B")
    p.add_argument("--base", metavar="MODEL", help="common base model: compare each model's delta from it")
    p.add_argument("--long", action="store_true", help="one row per tensor instead of a layer × module grid")
    p.add_argument(
        "--png", type=Path, metavar="PATH", help="write a heatmap (x = module, y = layer, one panel per metric)"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every tensor's numbers as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.set_defaults(handler=_diff)


def _add_inspect(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "inspect",
        help="tensors, special tokens, eos ids and chat template of a model; flags untrained token rows",
        description=(
            "Report a model's tensors, special tokens and eos ids, its chat template's end-of-turn token, and the "
            "norms of each special token's embedding and lm_head rows against all rows. Flags rows that look "
            "untrained and a chat template whose end-of-turn token generation does not stop on. Reads headers, "
            "JSON files and two matrices in chunks; runs no model code. Exit 0 unless --strict and flagged."
        ),
    )
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--strict", action="store_true", help="exit 1 if anything is flagged")
    p.add_argument("--all-tokens", action="store_true", help="list every special token (default: the first 40)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.set_defaults(handler=_inspect)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``eval``, ``diff`` and ``inspect`` on the ``mergekitlite`` parser."""
    _add_eval(sub)
    _add_diff(sub)
    _add_inspect(sub)
