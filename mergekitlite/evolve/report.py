"""What a search leaves behind: the best recipe (an ordinary recipe file), the leaderboard (md + json) and plots.

The best recipe keeps the model references as the template wrote them, so it is shareable like any recipe;
its header comments carry the score, the metrics, the held-out comparison with the baseline and the study's
provenance. ``merge best.yaml OUT`` (or ``evolve --merge-best OUT``) quotes it in the model card.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from mergekitlite import __version__
from mergekitlite.evolve import study as studies
from mergekitlite.evolve.search import VALUE_ATTR, Search
from mergekitlite.evolve.space import recipe_yaml


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _role(t: Any) -> str:
    role = t.user_attrs.get(studies.ROLE_ATTR, "")
    retried = t.system_attrs.get("failed_trial")
    return f"{role} (retry of #{retried})".strip() if retried is not None else role


def trial_rows(search: Search) -> list[dict[str, Any]]:
    """Every trial of the study: finished ones by score (best first), then the others by number."""
    trials = search.study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    rest = sorted((t for t in trials if t.state.name != "COMPLETE"), key=lambda t: t.number)
    rows = []
    for rank, t in enumerate([*done, *rest], start=1):
        rows.append(
            {
                "rank": rank if t.state.name == "COMPLETE" else None,
                "trial": t.number,
                "state": t.state.name.lower(),
                "score": t.value,
                "metrics": {k.removeprefix(VALUE_ATTR): v for k, v in t.user_attrs.items() if k.startswith(VALUE_ATTR)},
                "params": dict(t.params),
                "role": _role(t),
                "merge_seconds": t.user_attrs.get("merge_seconds"),
                "eval_seconds": t.user_attrs.get("eval_seconds"),
                "worker": t.user_attrs.get("worker"),
                "error": t.user_attrs.get("error"),
            }
        )
    return rows


def _spec_digest(search: Search) -> str:
    return hashlib.sha256(search.loaded.text.encode("utf-8")).hexdigest()


def summary(search: Search) -> dict[str, Any]:
    best = search.study.best_trial
    base = studies.baseline_trial(search.study)
    spec = search.loaded.spec
    return {
        "study": search.study_name,
        "storage": search.storage_url,
        "spec": str(search.loaded.path) if search.loaded.path else None,
        "spec_sha256": _spec_digest(search),
        "sampler": spec.optimizer.sampler,
        "seed": search.seed,
        "mergekitlite": __version__,
        "score": "maximised: Σ weight × goodness; goodness = the metric where higher is better, −log(perplexity), −KL",
        "objective": [{"name": t.label, "metric": t.metric, "weight": t.weight} for t in spec.objective],
        "holdout_terms": [{"name": t.label, "metric": t.metric, "weight": t.weight} for t in spec.holdout],
        "finished_trials": len([t for t in search.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]),
        "best_trial": best.number,
        "best_score": best.value,
        "baseline_trial": base.number if base is not None else None,
        "baseline_score": base.value if base is not None else None,
        "holdout": {str(k): v for k, v in sorted(search.holdout.items())},
    }


def _metrics_line(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in metrics.items())


def best_recipe_text(search: Search) -> str:
    s = summary(search)
    best = search.study.best_trial
    metrics = {t.label: best.user_attrs.get(VALUE_ATTR + t.label) for t in search.loaded.spec.objective}
    lines = [
        f"Found by `mergekitlite evolve` (mergekitlite {__version__}) on "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: the best of "
        f"{s['finished_trials']} finished trials.",
        f"Score {best.value:.6g} (trial #{best.number}; Σ weight × goodness, maximised).",
        f"Metrics: {_metrics_line(metrics)}.",
    ]
    if s["baseline_trial"] is not None:
        lines.append(
            f"Baseline (trial #{s['baseline_trial']}, the template's init values): score {s['baseline_score']:.6g}."
        )
    for number, label in ((best.number, "this recipe"), (s["baseline_trial"], "the baseline")):
        held = search.holdout.get(number) if number is not None else None
        if held:
            values = {k: v for k, v in held.items() if k != "score"}
            lines.append(f"Held out (never optimised), {label}: score {held['score']:.6g}; {_metrics_line(values)}.")
    lines += [
        f"Study {search.study_name!r} in {search.storage_url}; sampler {s['sampler']}, seed {s['seed']}.",
        f"Spec {s['spec']} (sha256 {s['spec_sha256'][:16]}).",
        "Merge it like any recipe: merge THIS_FILE OUT",
    ]
    return recipe_yaml(search.space.recipe_data(best.params), "\n".join(lines))


def leaderboard_markdown(search: Search, rows: list[dict[str, Any]]) -> str:
    s = summary(search)
    names = [t.label for t in search.loaded.spec.objective]
    params = [d.name for d in search.space.dimensions]
    out = [
        f"# Leaderboard: study {search.study_name}",
        "",
        f"{s['finished_trials']} finished trials; score = Σ weight × goodness (maximised; goodness = the metric where "
        "higher is better, −log(perplexity), −KL). Weights: "
        + ", ".join(f"{t['name']} × {t['weight']:g}" for t in s["objective"])
        + ".",
        "",
    ]
    if s["holdout"]:
        held_names = [t["name"] for t in s["holdout_terms"]]
        out += ["## Held out (measured after the search, never optimised)", ""]
        out += ["| trial | role | held-out score | " + " | ".join(held_names) + " |"]
        out += ["|---" * (3 + len(held_names)) + "|"]
        for number, values in s["holdout"].items():
            role = "best" if int(number) == s["best_trial"] else "baseline"
            cells = [_num(values.get(n)) for n in held_names]
            out.append(f"| {number} | {role} | {_num(values['score'])} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Trials", ""]
    out += ["| rank | trial | score | " + " | ".join([*names, *params]) + " | role | merge s | eval s |"]
    out += ["|---" * (6 + len(names) + len(params)) + "|"]
    for r in rows:
        if r["state"] != "complete":
            continue
        cells = [_num(r["metrics"].get(n)) for n in names] + [_num(r["params"].get(p)) for p in params]
        out.append(
            f"| {r['rank']} | {r['trial']} | {_num(r['score'])} | "
            + " | ".join(cells)
            + f" | {r['role']} | {_num(r['merge_seconds'])} | {_num(r['eval_seconds'])} |"
        )
    others = [r for r in rows if r["state"] != "complete"]
    if others:
        out += ["", "## Trials that did not finish", ""]
        out += [
            f"- #{r['trial']} ({r['state']}{', ' + r['role'] if r['role'] else ''}): {r['error'] or 'no result'}"
            for r in others
        ]
    return "\n".join(out) + "\n"


def plot(search: Search, folder: Path) -> list[Path]:
    """history.png: every trial's score and the best so far; params.png: the score against each parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history, plot_slice

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib: one trial gives identical axis limits
        ax = plot_optimization_history(search.study, target_name="score")
        ax.set_title(f"{search.study_name}: score per trial (higher is better)")
        path = folder / "history.png"
        ax.figure.set_size_inches(8, 4.5)
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
        axes = plot_slice(search.study, target_name="score")
        fig = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        n = len(search.space.dimensions)
        fig.set_size_inches(min(4 * n, 24), 4)
        fig.suptitle(f"{search.study_name}: score against each parameter (colour: trial number)")
        path = folder / "params.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def write_reports(search: Search) -> list[Path]:
    """best.yaml, leaderboard.md, leaderboard.json, history.png, params.png in the results folder."""
    folder = search.output
    rows = trial_rows(search)
    best = folder / "best.yaml"
    best.write_text(best_recipe_text(search), encoding="utf-8")
    md = folder / "leaderboard.md"
    md.write_text(leaderboard_markdown(search, rows), encoding="utf-8")
    js = folder / "leaderboard.json"
    js.write_text(
        json.dumps({**summary(search), "trials": rows}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return [best, md, js, *plot(search, folder)]
