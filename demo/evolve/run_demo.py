"""``make evolve-demo``: search the weights of recipes/demo.yaml instead of guessing them, then check on held-out
metrics that what the search found beats the hand-made recipe.

1. ``mergekitlite evolve demo/evolve/search.yaml`` → evolve/demo-evolve/ (best.yaml, leaderboard, plots);
2. merge recipes/demo.yaml (weights 1.0 and 1.0, chosen by hand) and the search's best.yaml;
3. measure both on the spec's held-out terms, which the search never optimised, side by side.

Run from the repository root:  ``.venv/bin/python demo/evolve/run_demo.py``  (``--trials N`` to change the budget).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SPEC = Path("demo/evolve/search.yaml")
HAND = Path("recipes/demo.yaml")
RESULTS = Path("evolve/demo-evolve")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, help="finished trials (default: the spec's budget)")
    parser.add_argument("--keep", action="store_true", help="resume the previous search instead of starting anew")
    args = parser.parse_args()
    console = Console(soft_wrap=True)
    if not SPEC.is_file() or not HAND.is_file():
        console.print("[red]run this from the repository root[/]")
        return 2
    from mergekitlite import MergeOptions, load_recipe, run_merge
    from mergekitlite.cli import main as cli_main
    from mergekitlite.evaluate import LoadOptions
    from mergekitlite.evolve.metrics import evaluate_terms, total_score
    from mergekitlite.evolve.spec import load_search
    from mergekitlite.evolve.trial import quiet_worker

    if RESULTS.exists() and not args.keep:
        shutil.rmtree(RESULTS)  # a fresh search each time (the study would otherwise resume, finished)
    console.rule(f"mergekitlite evolve {SPEC}")
    started = time.perf_counter()
    code = cli_main(
        ["evolve", str(SPEC), "--output", str(RESULTS), *(["--trials", str(args.trials)] * bool(args.trials))]
    )
    if code:
        return code
    searched = time.perf_counter() - started

    console.rule("held out: the hand recipe against the search's best")
    quiet_worker(1)  # tiny models: one thread beats a spinning pool; no loading bars
    holdout = load_search(SPEC).spec.holdout
    rows = {}
    for label, recipe, out in (
        ("by hand", HAND, Path("merged/demo")),
        ("searched", RESULTS / "best.yaml", Path("merged/demo-evolved")),
    ):
        run_merge(load_recipe(recipe), out, MergeOptions(overwrite=True, hash_inputs=False))
        rows[label] = evaluate_terms(out, holdout, LoadOptions())
    table = Table(title="never optimised: lower perplexities are better, ending answers (eos_rate) too")
    table.add_column("held-out metric")
    for label in rows:
        table.add_column(label, justify="right")
    table.add_row("score (higher is better)", *(f"{total_score(r):.3f}" for r in rows.values()))
    for i, term in enumerate(holdout):
        table.add_row(term.label, *(f"{r[i].value:.3f}" for r in rows.values()))
    console.print(table)
    hand, best = (total_score(r) for r in rows.values())
    verdict = "beats" if best > hand else "does NOT beat"
    console.print(
        f"The searched recipe {verdict} the hand recipe on held-out metrics ({best:.3f} vs {hand:.3f}); "
        f"search time {searched:.0f} s. By hand: {HAND} → merged/demo; searched: {RESULTS}/best.yaml → "
        "merged/demo-evolved."
    )
    return 0 if best > hand else 1


if __name__ == "__main__":
    sys.exit(main())
