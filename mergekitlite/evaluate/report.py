"""What eval returns and writes: per-model results, the report, its Markdown and JSON files."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str  # the new tokens, decoded, up to (not including) the stop token
    new_tokens: int  # tokens generated, the stop token included
    terminated: bool


@dataclass
class ModelResult:
    name: str
    path: str
    role: str  # "merged" or "parent"
    stop_ids: list[int]
    perplexity: float | None = None
    text_tokens: int = 0
    termination_rate: float | None = None
    mean_new_tokens: float | None = None
    end_prob_mean: float | None = None
    end_prob_min: float | None = None
    kl_mean: float | None = None  # KL(merged ‖ this model), nats per token; parents only
    generations: list[Generation] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvalReport:
    merged: str
    settings: dict[str, Any]
    models: list[ModelResult]

    def to_json(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))


def _finite(value: Any) -> Any:
    """NaN/inf → None, recursively (they are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _terminated(r: ModelResult) -> str:
    if r.termination_rate is None:
        return "—"
    done = sum(g.terminated for g in r.generations)
    return f"{r.termination_rate:.0%} ({done}/{len(r.generations)})"


# The results table, in the terminal (cli/cmd_eval.py) and in the Markdown report.
COLUMNS = (
    "model",
    "role",
    "perplexity",
    "ends its answer",
    "mean new tokens",
    "P(end) mean",
    "P(end) min",
    "KL(merged‖model)",
)


def row_cells(r: ModelResult) -> list[str]:
    """``r`` formatted for the results table, one cell per column of ``COLUMNS``."""
    return [
        r.name,
        r.role,
        _num(r.perplexity, "{:.3f}"),
        _terminated(r),
        _num(r.mean_new_tokens, "{:.1f}"),
        _num(r.end_prob_mean, "{:.3f}"),
        _num(r.end_prob_min, "{:.3f}"),
        _num(r.kl_mean, "{:.4f}"),
    ]


def clip(text: str, chars: int) -> str:
    one_line = text.replace("\n", "⏎")
    return one_line if len(one_line) <= chars else one_line[: chars - 1] + "…"


def shown(g: Generation, chars: int) -> str:
    """A generation cut to ``chars`` characters on one line, with whether it ended its turn."""
    return clip(g.text, chars) + (" ⏹" if g.terminated else " [no end token]")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(report: EvalReport, show: int, chars: int) -> str:
    s = report.settings
    lines = [f"# eval: {report.merged}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row_cells(r)) + " |" for r in report.models]
    lines += [
        "",
        "- **perplexity**: exp of the token-weighted mean NLL of the text file over sliding windows "
        f"(max_length {s['max_length']}, stride {s['stride']}, {s['windows']} window(s), {s['text_tokens']} tokens "
        f"of {s['text']}).",
        "- **ends its answer**: share of the prompts whose greedy continuation emits one of the model's own stop "
        f"ids (generation_config eos) within {s['max_new_tokens']} new tokens.",
        f"- **P(end)**: probability of {s['end_token']!r} (id {s['end_token_id']}) right after the teacher-forced "
        "reference answer.",
        f"- **KL(merged‖model)**: nats per token over the first {s['kl_tokens']} scored positions of the text.",
        f"- chat template: {s['chat_template_from']}; tokenizer: {s['tokenizer']}; prompts: {s['prompts']} "
        f"({s['prompt_count']}).",
        "",
        "| model | stop ids | time (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {_md_cell(r.name)} | {r.stop_ids} | {r.seconds:.1f} |" for r in report.models]
    if show > 0 and report.models and report.models[0].generations:
        lines += ["", f"## Generations (first {show}, greedy; ⏹ = ended its turn)", ""]
        for i, g in enumerate(report.models[0].generations[:show]):
            lines += [f"### {g.prompt}", ""]
            lines += [f"- **{r.name}**: {_md_cell(shown(r.generations[i], chars))}" for r in report.models]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def report_paths(path: Path) -> tuple[Path | None, Path | None]:
    """(markdown, json) to write: PATH.md and PATH.json, or only the one whose suffix PATH has."""
    if path.suffix == ".md":
        return path, None
    if path.suffix == ".json":
        return None, path
    return path.with_name(path.name + ".md"), path.with_name(path.name + ".json")


def write_report(report: EvalReport, path: Path, show: int, chars: int) -> list[Path]:
    md, js = report_paths(path)
    written = []
    for target, text in (
        (md, lambda: to_markdown(report, show, chars)),
        (js, lambda: json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"),
    ):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text(), encoding="utf-8")
            written.append(target)
    return written
