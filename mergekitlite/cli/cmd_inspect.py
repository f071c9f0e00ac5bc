"""``mergekitlite inspect MODEL [--strict]``: the report of ``inspect_model`` as tables and flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.budget import human
from mergekitlite.cli.console import say, write_json

if TYPE_CHECKING:
    from mergekitlite.inspect_model import InspectResult, TokenRow

SHOWN_TOKENS = 40  # special tokens listed without --all-tokens


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or hub id")
    p.add_argument("--strict", action="store_true", help="exit 1 if anything is flagged")
    p.add_argument("--all-tokens", action="store_true", help="list every special token (default: the first 40)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def summary_table(result: InspectResult) -> Table:
    # Token texts such as Mistral's "[INST]" would read as rich markup: user text goes in as Text.
    summary = Table(title=Text(f"inspect: {result.path}"), show_header=False, title_justify="left")
    summary.add_row("tensors", f"{result.tensors:,}")
    summary.add_row("parameters", f"{result.params:,} ({human(result.bytes)})")
    summary.add_row("dtypes", ", ".join(f"{d}: {n:,}" for d, n in sorted(result.params_by_dtype.items())))
    summary.add_row("layers", str(result.layers))
    head = result.lm_head_tensor or ("tied to the embedding" if result.tied_embeddings else "—")
    summary.add_row("embedding / lm_head", Text(f"{result.embed_tensor or '—'} / {head}"))
    summary.add_row("tokenizer eos", Text(result.eos_token or "—"))
    gen = str(result.generation_eos) if result.has_generation_config else "no generation_config.json"
    summary.add_row("generation_config eos", gen)
    summary.add_row("config eos", str(result.config_eos))
    summary.add_row("generate() stops on", str(result.stop_ids))
    template = "yes" if result.chat_template else "no"
    if result.chat_template:
        template += f", ends turns with {', '.join(result.turn_end_tokens) or 'no special token it writes literally'}"
    summary.add_row("chat template", Text(template))
    for label, st in (("embedding", result.embed_stats), ("lm_head", result.lm_head_stats)):
        if st is not None:
            summary.add_row(
                f"{label} row norms",
                f"mean {st.mean:.3g}, std {st.std:.3g}, median {st.median:.3g}, "
                f"min {st.min:.3g}, max {st.max:.3g}; untrained below {st.threshold:.3g}",
            )
    return summary


def _important(row: TokenRow) -> bool:
    return any(r != "special" and r != "added" for r in row.roles)


def tokens_table(rows: list[TokenRow]) -> Table:
    from mergekitlite.inspect_model import fmt_norm

    table = Table(title="special tokens", title_justify="left")
    for col, justify in (
        ("id", "right"),
        ("token", "left"),
        ("used as", "left"),
        ("embedding norm", "right"),
        ("lm_head norm", "right"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify)
    for row in rows:
        mark = (
            Text("looks untrained: " + ", ".join(row.untrained), style="red")
            if row.untrained
            else Text("; ".join(row.notes), style="dim")
        )
        table.add_row(
            str(row.id),
            Text(row.token),
            ", ".join(row.roles),
            fmt_norm(row.embed_norm),
            fmt_norm(row.lm_head_norm),
            mark,
        )
    return table


def render(result: InspectResult, console: Console, all_tokens: bool = False) -> None:
    """Summary, special tokens (flagged and used ones first) and flags."""
    console.print(summary_table(result))
    ordered = [r for r in result.tokens if r.untrained or _important(r)]
    ordered += [r for r in result.tokens if not (r.untrained or _important(r))]
    limit = None if all_tokens else SHOWN_TOKENS
    console.print(tokens_table(ordered[:limit]))
    if limit is not None and len(ordered) > limit:
        say(console, f"… {len(ordered) - limit} more special tokens (--all-tokens lists them)", "dim")
    if result.flags:
        say(console, f"{len(result.flags)} flag(s):", "yellow")
        for flag in result.flags:
            console.print(Text.assemble(("  •", "yellow"), " ", flag))
    else:
        say(console, "no flags", "green")


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.inspect_model import open_and_inspect

    result = open_and_inspect(args.model)
    if not args.quiet:
        render(result, console, all_tokens=args.all_tokens)
    if args.json:
        write_json(args.json, result.to_json())
        say(console, f"wrote {args.json}")
    return 1 if args.strict and result.flags else 0
