"""``mergekitlite extract-lora FINETUNED --base BASE --rank R OUT``: arguments, the report table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.cli.console import say
from mergekitlite.cli.flags import arg_type, count_arg
from mergekitlite.options import integer, positive, size

if TYPE_CHECKING:
    from mergekitlite.lora.extract import Report

UNCHANGED = "unchanged"  # lora.extract.UNCHANGED (not imported: building the parser imports no torch)

DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _module_rank(text: str) -> tuple[str, int]:
    pattern, sep, rank = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"expected PATTERN=RANK (e.g. mlp=32), got {text!r}")
    value = integer(rank)
    if value < 0:
        raise ValueError(f"a rank is at least 0 (0 leaves the module out), got {value}")
    return pattern, value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1] (got {text})")
    return value


def add_extract_lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("finetuned", help="the fine-tuned model (folder, hub id, or model+adapter)")
    p.add_argument(
        "out", type=Path, help="the adapter folder to write (adapter_config.json, adapter_model.safetensors)"
    )
    p.add_argument("--base", required=True, metavar="MODEL", help="the model it was fine-tuned from")
    p.add_argument(
        "--rank",
        "--max-rank",
        type=count_arg,
        metavar="R",
        help="the largest rank of any module (with --energy: the cap); without --energy every module gets R",
    )
    p.add_argument(
        "--module-rank",
        action="append",
        default=[],
        type=arg_type(_module_rank),
        metavar="PATTERN=R",
        help="rank of the modules PATTERN matches (substring, glob or re:regex of the module path; first match "
        "wins; 0 leaves them out), e.g. --module-rank mlp=32 --module-rank 're:\\.(q|k)_proj$=8'",
    )
    p.add_argument(
        "--energy",
        type=arg_type(_share),
        metavar="F",
        help="each module's smallest rank keeping the share F of its squared singular values (e.g. 0.9)",
    )
    p.add_argument(
        "--embed-lora",
        action="store_true",
        help="decompose the embeddings (lora_embedding_A/B) and the output head too, instead of saving them whole",
    )
    p.add_argument(
        "--save-module", action="append", default=[], metavar="PATTERN", help="save these modules whole (repeatable)"
    )
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="leave these tensors out")
    p.add_argument(
        "--skip-undecomposable",
        action="store_true",
        help="leave out tensors a LoRA cannot express (norms, 1-D tensors) instead of saving them whole",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the adapter's tensors (default: each tensor's)")
    p.add_argument(
        "--max-ram",
        type=arg_type(size, positive),
        metavar="SIZE",
        help="memory limit: a tensor whose SVD would need more is an error before anything is written "
        "(default: the memory available)",
    )
    p.add_argument("--device", default="cpu", metavar="DEV", help="where the SVD runs: cpu (default), cuda, auto")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new adapter is complete")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def summary_table(report: Report) -> Table:
    """One row per module kind (layer numbers folded): how many, ranks, share of Σσ² kept, relative errors."""
    groups: dict[tuple[str, str], list] = {}
    for e in report.entries:
        if e.kind == UNCHANGED:
            continue
        key = (re.sub(r"\.\d+\.", ".*.", e.module), e.kind)
        groups.setdefault(key, []).append(e)
    table = Table(title="‖ΔW − B·A‖ / ‖ΔW‖ per module", title_justify="left")
    for col, just in (("module", "left"), ("what", "left"), ("n", "right"), ("rank", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for col in ("energy kept", "error (mean)", "error (max)"):
        table.add_column(col, justify="right")
    for (module, kind), entries in groups.items():
        ranks = sorted({e.rank for e in entries})
        energies = [e.energy for e in entries if e.energy is not None]
        errors = [e.rel_error for e in entries]
        table.add_row(
            Text(module),
            kind,
            str(len(entries)),
            (f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}") if ranks != [0] else "",
            f"{min(energies):.4f}" if energies else "",
            f"{sum(errors) / len(errors):.3g}",
            f"{max(errors):.3g}",
        )
    return table


def cmd_extract_lora(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.cli.progress import byte_progress
    from mergekitlite.lora.extract import REPORT, ExtractOptions, extract_lora

    opts = ExtractOptions(
        rank=args.rank,
        module_ranks=tuple(args.module_rank),
        energy=args.energy,
        embed_lora=args.embed_lora,
        save_modules=tuple(args.save_module),
        exclude=tuple(args.exclude),
        skip_undecomposable=args.skip_undecomposable,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_ram=args.max_ram,
        device=args.device,
    )
    progress = byte_progress(console, "extracting", disable=args.quiet)
    with progress:
        task = progress.add_task("extract", total=None, tensor="")
        report = extract_lora(
            args.finetuned,
            args.base,
            args.out,
            opts,
            overwrite=args.overwrite,
            on_item=lambda item: progress.update(task, advance=item.ft.nbytes, tensor=item.name),
        )
    console.print(summary_table(report))
    same = sum(e.kind == UNCHANGED for e in report.entries)
    say(console, f"{same} tensor(s) equal in both models (nothing to store)")
    say(console, f"overall ‖ΔW − B·A‖ / ‖ΔW‖ = {report.overall_error():.4g}; r = {report.rank}")
    say(console, f"wrote {args.out} (report: {args.out / REPORT})", "green")
    return 0
