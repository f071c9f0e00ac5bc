"""Throughput and memory of `mergekitlite evolve` on the shipped tiny family (demo/evolve/search.yaml).

Measures, on a quiet machine:

* **trials per hour** of a whole search (merge + measurement per trial, the study's bookkeeping, worker start-up
  included), for ``--jobs`` local workers, from the wall time of ``run_search`` with ``--trials`` trials; and the
  median merge and measurement seconds of one trial, from the leaderboard;
* **peak RSS of a trial**: one trial run alone in a fresh interpreter (its ``ru_maxrss``: interpreter, torch,
  transformers, the merge and the measured model), which is what ``TRIAL_BASELINE_RSS`` in
  ``mergekitlite/evolve/prepare.py`` stands for.

    .venv/bin/python bench/evolve_bench.py --trials 40 --jobs 2 --json bench/.work/evolve.json

Run it from the repository root (the spec names the demo files relative to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = Path("demo/evolve/search.yaml")

ONE_TRIAL = """
import json, resource, sys
from pathlib import Path
from mergekitlite.evolve.search import SearchOptions, job, prepare_search
from mergekitlite.evolve.spec import load_search
from mergekitlite.evolve.trial import quiet_worker, run_trial

quiet_worker(1)
search = prepare_search(load_search(sys.argv[1]), SearchOptions(output=Path(sys.argv[2]), jobs=1))
outcome = run_trial(job(search, 0, search.space.baseline(), search.resolved.terms))
assert outcome.ok, outcome.error
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
times = {"merge_seconds": outcome.merge_seconds, "eval_seconds": outcome.eval_seconds}
print(json.dumps({"peak_rss_bytes": peak, **times}))
"""


def trial_peak(spec: Path, work: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", ONE_TRIAL, str(spec), str(work)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def search_rate(spec: Path, trials: int, jobs: int, work: Path) -> dict[str, float]:
    from mergekitlite.evolve.search import SearchOptions, run_search
    from mergekitlite.evolve.spec import load_search

    started = time.perf_counter()
    search = run_search(load_search(spec), SearchOptions(output=work, trials=trials, jobs=jobs))
    seconds = time.perf_counter() - started
    done = [t for t in search.study.get_trials() if t.state.name == "COMPLETE"]
    return {
        "trials": len(done),
        "jobs": search.workers.count,
        "wall_seconds": seconds,
        "trials_per_hour": len(done) / seconds * 3600,
        "median_merge_seconds": statistics.median(t.user_attrs["merge_seconds"] for t in done),
        "median_eval_seconds": statistics.median(t.user_attrs["eval_seconds"] for t in done),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mkl-evolve-bench-") as tmp:
        peak = trial_peak(args.spec, Path(tmp) / "one")
        rate = search_rate(args.spec, args.trials, args.jobs, Path(tmp) / "search")
    result = {"spec": str(args.spec), "one_trial": peak, "search": rate}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
