"""The command line: ``merge RECIPE [OUT]`` and ``mergekitlite {merge,plan,validate,schema,methods,eval,diff,
inspect}``. Argument parsing, printing and rich rendering live here; the domain modules compute and
return data. Building the parsers imports no torch (``merge --help``, ``mergekitlite validate`` start
fast): each command imports what it needs when it runs.

Exit codes: 0 success, 2 a problem with the recipe, models or output that the message explains,
130 interrupted (the partial output is kept for ``--resume``), 1 anything unexpected (a bug).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mergekitlite import __version__
from mergekitlite.cli.cmd_diff import add_diff_arguments, cmd_diff
from mergekitlite.cli.cmd_eval import add_eval_arguments, cmd_eval
from mergekitlite.cli.cmd_evolve import add_evolve_arguments, add_evolve_schema_arguments, cmd_evolve, cmd_evolve_schema
from mergekitlite.cli.cmd_inspect import add_inspect_arguments, cmd_inspect
from mergekitlite.cli.cmd_lora import add_extract_lora_arguments, cmd_extract_lora
from mergekitlite.cli.cmd_merge import add_merge_arguments, add_plan_arguments, cmd_merge, cmd_plan
from mergekitlite.cli.cmd_recipes import (
    add_schema_arguments,
    add_validate_arguments,
    cmd_methods,
    cmd_schema,
    cmd_validate,
)
from mergekitlite.cli.console import Handler, run_command
from mergekitlite.cli.flags import OneLineParser
from mergekitlite.cli.mergekit import MERGEKIT_NO_OPS, MERGEKIT_UNSUPPORTED

__all__ = ["MERGEKIT_NO_OPS", "MERGEKIT_UNSUPPORTED", "main", "merge_main"]

VERSION = f"mergekitlite {__version__}"


def _version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=VERSION, help="print the version and exit")


def merge_main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="merge", description="Merge models as a recipe says (mergekit YAML format).")
    _version(parser)
    add_merge_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(cmd_merge, args)


# (name, one-line help, description or None, argument adder or None, handler) of each `mergekitlite` command.
COMMANDS: tuple[tuple[str, str, str | None, Callable[[argparse.ArgumentParser], None] | None, Handler], ...] = (
    ("merge", "run a recipe (same as the `merge` command)", None, add_merge_arguments, cmd_merge),
    (
        "plan",
        "validate a recipe and show what the merge will do, from headers only",
        "What `merge` with the same options will do: tensors, shards, chunk sizes and the memory estimate, from "
        "the inputs' headers (no weights are read, nothing is written).",
        add_plan_arguments,
        cmd_plan,
    ),
    ("validate", "check recipe files without opening any model", None, add_validate_arguments, cmd_validate),
    ("schema", "write the recipe JSON schema (for editors and CI)", None, add_schema_arguments, cmd_schema),
    ("methods", "list merge methods and their parameters", None, None, cmd_methods),
    (
        "eval",
        "measure a merged model next to its parents: perplexity, end-of-turn behaviour, KL",
        "Measure a merged model and each parent side by side, on the same token ids: perplexity of a text "
        "file (sliding windows), how often a greedy answer to each prompt ends with the model's stop token, "
        "the probability of the end-of-turn token right after each reference answer, KL(merged ‖ parent) of "
        "next-token distributions, and the first generations. Models are loaded one at a time.",
        add_eval_arguments,
        cmd_eval,
    ),
    (
        "diff",
        "relative weight differences per layer and module (to choose per-layer merge weights)",
        "Per layer and module: ‖A − B‖/‖B‖, or with --base how far each model moved from the base "
        "(‖A − base‖/‖base‖, ‖B − base‖/‖base‖) and the cosine between the two moves. Where a fine-tune moved "
        "the weights most, or where two fine-tunes pull in opposite directions (cosine < 0), is where a "
        "recipe's per-layer weight gradient (e.g. weight: [0.2, 0.5, 1.0]) matters. Tensors are streamed in "
        "row chunks: a 14B model needs only a few tens of MB.",
        add_diff_arguments,
        cmd_diff,
    ),
    (
        "inspect",
        "tensors, special tokens, eos ids and chat template of a model; flags untrained token rows",
        "Report a model's tensors, special tokens and eos ids, its chat template's end-of-turn token, and the "
        "norms of each special token's embedding and lm_head rows against all rows. Flags rows that look "
        "untrained, a chat template whose end-of-turn token generation does not stop on, and a trained "
        "end-of-turn token that is neither an eos id nor closed by the chat template. Reads headers, JSON "
        "files and two matrices in chunks; runs no model code. Exit 0 unless --strict and flagged.",
        add_inspect_arguments,
        cmd_inspect,
    ),
    (
        "extract-lora",
        "a LoRA adapter (PEFT) of FINETUNED − BASE by truncated SVD",
        None,
        add_extract_lora_arguments,
        cmd_extract_lora,
    ),
    (
        "evolve",
        "search for the recipe that scores best (CMA-ES over a recipe template)",
        "Search a recipe template's free parameters (weights, densities, gradients, a choice of method) for the "
        "recipe that scores best on an objective (perplexity, Q/A, KL to a parent, EOS rate, lm-eval tasks), "
        "trials merging and measuring locally or on a Ray cluster; the study resumes where it stopped.",
        add_evolve_arguments,
        cmd_evolve,
    ),
    (
        "evolve-schema",
        "write the search spec JSON schema (for editors and CI)",
        None,
        add_evolve_schema_arguments,
        cmd_evolve_schema,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mergekitlite", description="YAML-recipe driven model merging.")
    _version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_line, description, add_arguments, handler in COMMANDS:
        p = sub.add_parser(name, help=help_line, description=description or help_line)
        if add_arguments is not None:
            add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
