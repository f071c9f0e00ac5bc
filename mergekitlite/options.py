"""Options declared once: each field of an options dataclass carries its command-line spelling, help
text, parser and check, so the CLI generates its flags from the declaration (``cli/flags.py``) and
the API validates a value the same way whether it came from a flag or from Python.

``MergeOptions`` is here rather than in ``api.py`` so that building the ``merge``/``plan`` parsers
imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekitlite.budget import parse_size
from mergekitlite.errors import OptionError

# The default output shard size (bytes); the planner uses it too.
DEFAULT_SHARD_SIZE = 5 * 1000**3
MERGEKIT_GROUP = "mergekit-yaml options"


Check = Callable[[Any], "str | None"]  # value → why it is not allowed, or None


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else f"must be at least 1 (got {value})"


def positive(value: int) -> str | None:
    return None if value > 0 else f"must be more than 0 (got {value})"


def size(text: str) -> int:
    """'5GB', '500MiB', '2e9' → bytes (``budget.parse_size``)."""
    return parse_size(text)


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


@dataclass(frozen=True)
class Flag:
    """How one option is written on the command line. A field without a ``parse`` is a switch when
    its default is a bool (the flag turns the default around), else it takes its text as is."""

    names: tuple[str, ...]
    help: str
    parse: Callable[[str], Any] | None = None
    check: Check | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    group: str | None = None  # argparse group title; None: the command's own options
    planning: bool = False  # it changes the plan: `plan` takes it too

    @property
    def spelling(self) -> str:
        return "/".join(self.names)


def option(
    default: Any,
    *names: str,
    help: str,
    parse: Callable[[str], Any] | None = None,
    check: Check | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    group: str | None = None,
    planning: bool = False,
) -> Any:
    """A dataclass field with its command-line declaration in ``metadata["flag"]``."""
    flag = Flag(names, help, parse, check, metavar, choices, group, planning)
    return field(default=default, metadata={"flag": flag})


def size_option(default: int | None, *names: str, help: str, **declared: Any) -> Any:
    """A byte size (``5GB``, ``500MiB``, ``2e9``), more than 0; ``declared``: more of ``option``'s arguments."""
    return option(default, *names, parse=size, check=positive, help=help, **({"metavar": "SIZE"} | declared))


def count_option(default: int | None, *names: str, help: str, **declared: Any) -> Any:
    """A whole number, at least 1; ``declared``: more of ``option``'s arguments."""
    return option(default, *names, parse=integer, check=at_least_one, help=help, **({"metavar": "N"} | declared))


def flag_of(f: dataclasses.Field[Any]) -> Flag | None:
    return f.metadata.get("flag")


def check_values(options: Any) -> None:
    """Every declared check and choice of ``options`` (a dataclass instance); one error lists all problems."""
    problems = []
    for f in dataclasses.fields(options):
        flag, value = flag_of(f), getattr(options, f.name)
        if flag is None or value is None:
            continue
        why = flag.check(value) if flag.check else None
        if why is None and flag.choices and value not in flag.choices:
            why = f"expected one of {', '.join(flag.choices)} (got {value!r})"
        if why:
            problems.append(f"{f.name} ({flag.spelling}): {why}")
    if problems:
        raise OptionError("\n".join(problems))


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (the recipe says what to merge). Every field but ``cache_dir`` is a flag of
    ``merge``; those marked ``planning`` are flags of ``plan`` too."""

    device: str = option(
        "cpu", "--device", help="where to compute: cpu (default), cuda, cuda:1, mps, auto", planning=True
    )
    shard_size: int = size_option(
        DEFAULT_SHARD_SIZE,
        "--shard-size",
        help="maximum output shard size (default 5GB)",
        planning=True,
    )
    shard_params: int | None = size_option(
        None,
        "--out-shard-size",
        metavar="N",
        help="parameters per output shard, mergekit's unit (e.g. 1B); --shard-size counts bytes",
        group=MERGEKIT_GROUP,
        planning=True,
    )
    compute_dtype: str | None = option(
        None,
        "--compute-dtype",
        choices=("float32", "float64", "bfloat16", "float16"),
        help="override the recipe's compute_dtype (default float32)",
        planning=True,
    )
    max_ram: int | None = size_option(
        None,
        "--max-ram",
        help="RAM the whole process may use, e.g. 32GB (default: a quarter of what is free)",
        planning=True,
    )
    max_vram: int | None = size_option(
        None,
        "--max-vram",
        help="GPU memory for the arithmetic, e.g. 8GB (default: 80% of what is free)",
        planning=True,
    )
    random_seed: int | None = option(
        None,
        "--random-seed",
        parse=integer,
        metavar="N",
        help="seed for random methods such as DARE (overrides the recipe)",
        planning=True,
    )
    resume: bool = option(False, "--resume", help="continue an interrupted merge from OUT.partial")
    overwrite: bool = option(False, "--overwrite", help="replace OUT if it exists (after the new merge is complete)")
    threads: int | None = count_option(
        None,
        "-j",
        "--threads",
        help="chunks merged in parallel (default: one per core)",
        planning=True,  # the number of chunks in flight sizes them
    )
    hash_inputs: bool = option(True, "--no-hash", help="do not record sha256 of the inputs in the model card")
    native: bool = option(
        True,
        "--no-native",
        help="torch ops instead of the native C kernels (same bits, slower)",
    )
    copy_tokenizer: bool = option(True, "--no-copy-tokenizer", help="write no tokenizer files", group=MERGEKIT_GROUP)
    strict: bool = option(
        False,
        "--strict",
        help="recipe warnings (keys mergekit ignores, duplicate keys, unused parameters) are errors, and so is "
        "a merged tensor holding NaN/inf (the output then stays in OUT.partial)",
        planning=True,
    )
    cache_dir: Path | None = None  # input-hash cache; default ~/.cache/mergekitlite (API only)
    intermediate_dir: Path | None = option(
        None,
        "--intermediate-dir",
        parse=Path,
        metavar="DIR",
        help="where named steps of a multi-step recipe go (default OUT.steps/)",
        planning=True,  # where earlier steps are is where later steps' inputs are
    )

    def __post_init__(self) -> None:
        check_values(self)
