"""Command-line flags generated from option declarations (``mergekitlite.options``), argument
types that turn parse and range errors into one-line usage errors, and a parser whose usage errors
are one line."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, NoReturn

from mergekitlite.options import Check, at_least_one, flag_of, integer


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line, the problem first (argparse would print the whole usage before it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def arg_type(parse: Callable[[str], Any], check: Check | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse`` the text, then ``check`` the value; either's message becomes
    argparse's ``argument -j/--threads: must be at least 1 (got 0)``."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        why = check(value) if check else None
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    return convert


count_arg = arg_type(integer, at_least_one)  # 1, 2, ...


def add_option_flags(
    parser: argparse.ArgumentParser,
    options_class: type,
    *,
    planning_only: bool = False,
    groups: dict[str, Any] | None = None,
) -> None:
    """One flag per declared field of ``options_class`` (``dest`` = the field name). ``groups``:
    argparse groups by title, created as needed."""
    groups = {} if groups is None else groups
    for f in dataclasses.fields(options_class):
        flag = flag_of(f)
        if flag is None or (planning_only and not flag.planning):
            continue
        target = parser
        if flag.group is not None:
            target = groups.get(flag.group) or groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        kwargs: dict[str, Any] = {"dest": f.name, "help": flag.help.replace("%", "%%")}
        if flag.parse is None and isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            kwargs |= {"default": f.default, "metavar": flag.metavar, "choices": flag.choices}
            if flag.parse is not None:
                kwargs["type"] = arg_type(flag.parse, flag.check)
        target.add_argument(*flag.names, **kwargs)


def option_values(options_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The declared fields of ``options_class`` that ``args`` has flags for, by field name."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(options_class)
        if flag_of(f) is not None and hasattr(args, f.name)
    }
