"""Commands about recipes rather than models: ``validate``, ``schema``, ``methods``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.cli.console import say, warn
from mergekitlite.errors import MergekitliteError

if TYPE_CHECKING:
    from mergekitlite.methods.registry import MethodSpec

SCHEMA_PATH = Path("schemas/recipe.schema.json")


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", type=Path)
    p.add_argument("--strict", action="store_true", help="warnings (e.g. keys mergekit ignores) are errors")


def add_schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, default=SCHEMA_PATH)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.recipe import load_recipes

    failed = 0
    for path in args.recipes:
        try:
            steps = load_recipes(path, strict=args.strict)
        except MergekitliteError as exc:
            failed += 1
            say(console, str(exc), "red")
            continue
        for step in steps:
            warn(console, step.warnings)
        say(console, f"{path}: ok" + (f" ({len(steps)} steps)" if len(steps) > 1 else ""))
    return 2 if failed else 0


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
    target: Path = args.output
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            say(console, f"{target} is stale: run `mergekitlite schema` to regenerate it", "red")
            return 1
        say(console, f"{target} is up to date")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    say(console, f"wrote {target}")
    return 0


def plain(doc: str) -> str:
    """Docstring text for a terminal: ``code`` and `code` lose their backticks."""
    return re.sub(r"`+([^`]+)`+", r"\1", doc)


def _parameters(spec: MethodSpec) -> str:
    return ", ".join(
        f"{p.name}{'*' if p.per_model else ''}" + ("" if p.required else f"={p.default}") for p in spec.params
    )


_BASE = {"required": "needs base_model", "optional": "base_model optional", "unused": "no base_model"}


def methods_table(specs: dict[str, MethodSpec]) -> Table:
    """Two columns that read at 80 columns: the name (never wrapped; aliases on their own lines) and
    what the method does, its base model use and its parameters (wrapped at word boundaries)."""
    table = Table(title="merge methods", title_justify="left", show_lines=True, caption_justify="left")
    table.add_column("method", no_wrap=True, style="bold")
    table.add_column("what it does; parameters (* per model, =default)", ratio=1)
    for name in sorted(specs):
        spec = specs[name]
        label = Text(name)
        for alias in spec.aliases:
            label.append(f"\n= {alias}", style="dim")
        body = Text(plain(spec.summary))
        body.append(f"\n{_BASE.get(spec.base, spec.base)}", style="dim")
        params = _parameters(spec)
        body.append(f"; {params}" if params else "; no parameters", style="dim")
        table.add_row(label, body)
    table.caption = "* per model (under each model's parameters, or globally); =value: the default"
    return table


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.methods import REGISTRY

    console.print(methods_table(REGISTRY.methods))
    return 0
