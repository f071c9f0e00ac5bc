"""``python -m mergekitlite.demo``: the main job on the embedded tiny family, end to end.

Merges the shipped tiny models (demo/models: a base LM, a chat fine-tune of it, and a
continued-pretraining fine-tune; see demo/README.md) the way the seed merged nekomata and qarasu,
twice: with the chat model donating tokenizer, chat template and stop tokens (recipes/demo.yaml)
and with the pretrained base donating them (recipes/demo-eos-broken.yaml, the seed's mistake).
Then it shows what was written, what ``mergekitlite inspect`` flags in each, and measures both merges
next to their parents.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.budget import human
from mergekitlite.cli import main as cli_main
from mergekitlite.cli import merge_main
from mergekitlite.cli.console import make_console, say

RECIPES = (Path("recipes/demo.yaml"), Path("recipes/demo-eos-broken.yaml"))
PARENTS = ("demo/models/continued", "demo/models/chat", "demo/models/base")
HELDOUT = Path("demo/data/continued_heldout.txt")
PROMPTS = Path("demo/prompts.yaml")


def _listing(folder: Path) -> Table:
    table = Table(title=Text(str(folder)), show_header=True)
    table.add_column("file")
    table.add_column("size", justify="right")
    for p in sorted(folder.iterdir()):
        table.add_row(Text(p.name), human(p.stat().st_size))
    return table


def _summary(reports: dict[Path, Path]) -> Table:
    table = Table(title="the seed's question: does the merged chat model stop?")
    for col in ("merge", "ends its answer", "perplexity on the new domain", "stops on"):
        table.add_column(col)
    for out, report in reports.items():
        merged = json.loads(report.read_text(encoding="utf-8"))["models"][0]
        table.add_row(
            Text(str(out)),
            f"{merged['termination_rate']:.0%}",
            f"{merged['perplexity']:.1f}",
            ", ".join(str(i) for i in merged["stop_ids"]),
        )
    return table


def _inspect(console: Console, out: Path) -> None:
    """What ``mergekitlite inspect`` flags in a merge: the broken one's end-of-turn token that nothing stops on."""
    from mergekitlite.inspect_model import open_and_inspect

    flags = open_and_inspect(str(out)).flags
    say(console, f"mergekitlite inspect {out}: " + (f"{len(flags)} flag(s)" if flags else "no flags"))
    for flag in flags:
        say(console, f"  • {flag}", "yellow")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergekitlite.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-eval", action="store_true", help="only merge; skip the side-by-side evaluation")
    args = parser.parse_args(argv)
    console = make_console()
    missing = [str(p) for p in (*RECIPES, HELDOUT, PROMPTS, *map(Path, PARENTS)) if not p.exists()]
    if missing:
        say(console, f"run this from the repository root: missing {', '.join(missing)}", "red")
        return 2
    outputs = []
    for recipe in RECIPES:
        console.rule(Text(f"merge {recipe}"))
        out = Path("merged") / recipe.stem
        code = merge_main([str(recipe), str(out), "--overwrite"])
        if code:
            return code
        outputs.append(out)
        console.print(_listing(out))
        _inspect(console, out)
    if args.no_eval:
        return 0
    reports = {}
    for out in outputs:
        console.rule(Text(f"mergekitlite eval {out}"))
        report = out.with_name(out.name + "-eval.json")
        # One thread: these models are tiny, and spinning thread pools only slow them down.
        eval_args = ["--text", str(HELDOUT), "--prompts", str(PROMPTS), "--max-new-tokens", "48", "-j", "1"]
        code = cli_main(["eval", str(out), "--against", *PARENTS, *eval_args, "--report", str(report)])
        if code:
            return code
        reports[out] = report
    console.print(_summary(reports))
    say(
        console,
        "Same weights, different metadata: the broken merge took its generation_config from the pretrained base, "
        "so it writes <|im_end|> and keeps going (the seed's nekoqarasu); the fixed one stops.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
