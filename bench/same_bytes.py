"""Refactors keep output bytes identical: merge a fixed set of recipes with two versions of the code and
compare every output file.

The set: every method of the parity benchmark (bench/parity.py's recipes over its generated family), the
shipped demo recipes, and demo-family recipes that exercise the planner's side paths (slices with a
frankenmerge, rules that take tensors, special-token rows, a multi-step file). Each run merges with the
code in ``--code`` (a folder holding a ``mergekitlite`` package: a frozen copy of an older checkout, or the
working tree) and records the sha256 of every output file except the provenance files, which name the
code version and the time.

    python bench/same_bytes.py prepare                           # family + recipes in bench/.work/same-bytes/
    python bench/same_bytes.py run --code /tmp/before --label before
    python bench/same_bytes.py run --code . --label after
    python bench/same_bytes.py compare before after              # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work" / "same-bytes"
RECIPES = WORK / "recipes"
# Files that record versions, times or the run's own paths; everything else must be identical.
PROVENANCE = {"mergekitlite.json", "README.md"}


def _demo_recipes() -> dict[str, str]:
    demo = REPO / "demo" / "models"
    base, chat, cont = (str(demo / m) for m in ("base", "chat", "continued"))
    return {
        "demo-special-tokens": f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {cont}
    parameters: {{weight: 1.0}}
  - model: {chat}
    parameters: {{weight: [0.6, 1.0]}}
dtype: bfloat16
tokenizer: {{source: {chat}, special_tokens: take, tokens: {{"<|im_end|>": {{source: {chat}}}}}}}
rules:
  - match: "*norm*"
    take: {cont}
  - match: "re:layers\\\\.2\\\\.mlp"
    method: linear
    parameters: {{weight: 0.5}}
""",
        "demo-frankenmerge": f"""
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {chat}, layer_range: [1, 3]}}]
  - sources: [{{model: {cont}, layer_range: [2, 3]}}]
dtype: float16
""",
        "demo-slices-ties": f"""
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {chat}, layer_range: [0, 3], parameters: {{weight: 1.0, density: 0.6}}}}
      - {{model: {cont}, layer_range: [0, 3], parameters: {{weight: 0.5, density: [0.3, 0.9]}}}}
parameters:
  normalize: false
dtype: bfloat16
tokenizer_source: {chat}
""",
        "demo-two-step": f"""
name: step1
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {chat}
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.3}}]
dtype: float32
---
merge_method: dare_ties
base_model: {base}
models:
  - model: step1
    parameters: {{weight: 0.7, density: 0.7}}
  - model: {cont}
    parameters: {{weight: 0.5, density: 0.5}}
random_seed: 7
dtype: bfloat16
tokenizer_source: {chat}
""",
    }


def prepare() -> None:
    sys.path.insert(0, str(BENCH))
    import make_family
    import parity
    import procstats

    family, spec = make_family.ensure_in_child("parity-small")
    RECIPES.mkdir(parents=True, exist_ok=True)
    layers = spec.sizes.layers
    for case in parity.cases(family, layers):
        (RECIPES / f"parity-{procstats.slug(case.name)}.yaml").write_text(yaml.safe_dump(case.recipe, sort_keys=False))
    for name, text in _demo_recipes().items():
        (RECIPES / f"{name}.yaml").write_text(text.lstrip())
    for shipped in ("demo.yaml", "demo-eos-broken.yaml"):
        text = (REPO / "recipes" / shipped).read_text().replace("demo/models/", f"{REPO}/demo/models/")
        (RECIPES / f"shipped-{shipped}").write_text(text)
    print(f"{len(list(RECIPES.glob('*.yaml')))} recipes in {RECIPES}")


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in PROVENANCE:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(code: Path, label: str) -> None:
    results: dict[str, object] = {}
    env = {**os.environ, "PYTHONPATH": str(code.resolve()), "HF_HUB_OFFLINE": "1"}
    runner = "import sys; from mergekitlite.cli import merge_main; sys.exit(merge_main())"
    for recipe in sorted(RECIPES.glob("*.yaml")):
        out = WORK / "out" / label / recipe.stem
        cmd = [sys.executable, "-c", runner, str(recipe), str(out), "--overwrite", "--no-hash", "-q"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=WORK)
        if proc.returncode != 0:
            results[recipe.stem] = {"exit": proc.returncode, "error": proc.stderr.strip()[-2000:]}
        else:
            results[recipe.stem] = _digest(out)
        print(f"{recipe.stem}: exit {proc.returncode}", flush=True)
    path = WORK / f"{label}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def compare(a: str, b: str) -> int:
    left = json.loads((WORK / f"{a}.json").read_text())
    right = json.loads((WORK / f"{b}.json").read_text())
    bad = 0
    for name in sorted(set(left) | set(right)):
        if left.get(name) == right.get(name):
            continue
        bad += 1
        la, rb = left.get(name) or {}, right.get(name) or {}
        files = sorted(f for f in set(la) | set(rb) if la.get(f) != rb.get(f))
        print(f"DIFFERENT {name}: {', '.join(files[:8])}")
    print(f"{len(set(left) | set(right)) - bad} identical, {bad} different ({a} vs {b})")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--code", type=Path, required=True, help="folder that holds the mergekitlite package to run")
    r.add_argument("--label", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare()
        return 0
    if args.cmd == "run":
        run(args.code, args.label)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
