"""Tests of the benchmark harness itself: ``.venv/bin/python -m pytest bench -q`` (seconds; not in ``make test``,
whose testpaths are tests/).

The generator's bytes are pinned to those of the generators it replaced (bench/make_family.py and
bench/parity_family.py before they were one), computed by the old code for the same small family.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import compare
import harness
import make_family
import pytest
import startup
import tiebreak
import torch
from procstats import Job, interleave, summarize
from reference import RecipeReference
from safetensors.torch import load_file

MICRO = make_family.Sizes(hidden=16, layers=2, vocab=40, intermediate=24, heads=4, kv_heads=2, shard_bytes=3000)
# sha256 over every file but the marker, as the old generators wrote them for MICRO (seed 3).
OLD_BYTES = {
    "independent": "54d2f609a68070881d579659f8df4ba8415056e9573da55d8df203c4bb3e9993",
    "correlated": "0c43c387ff9367498ebb3e8be1ef1058e8885e8765041accf39ef1f5631fcd8f",
}


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != make_family.MARKER:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    ("kind", "family"),
    [
        ("independent", make_family.Family(MICRO, seed=3)),
        ("correlated", make_family.Family(MICRO, fine_tunes=3, rho=0.5, seed=3)),
    ],
)
def test_family_bytes_are_the_old_generators(tmp_path: Path, kind: str, family: make_family.Family) -> None:
    out = make_family.ensure_family(family, tmp_path / kind)
    assert digest(out) == OLD_BYTES[kind]
    assert sorted(p.name for p in out.iterdir()) == sorted([*family.models, make_family.MARKER])
    assert len(list((out / "base").glob("*.safetensors"))) == 4  # 3000-byte shards
    index = json.loads((out / "base" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in family.specs())


def test_family_is_reused_only_when_the_marker_matches(tmp_path: Path) -> None:
    family = make_family.Family(MICRO, seed=1)
    out = make_family.ensure_family(family, tmp_path / "f")
    stamp = (out / "ft1" / "config.json").stat().st_mtime_ns
    assert make_family.is_current(out, family)
    make_family.ensure_family(family, out)
    assert (out / "ft1" / "config.json").stat().st_mtime_ns == stamp  # reused
    assert not make_family.is_current(out, replace(family, noise=0.1))
    make_family.ensure_family(replace(family, noise=0.1), out)
    assert make_family.is_current(out, replace(family, noise=0.1))


def _models(out: Path, family: make_family.Family) -> dict[str, dict[str, torch.Tensor]]:
    models = {}
    for m in family.models:
        models[m] = {}
        for f in (out / m).glob("*.safetensors"):
            models[m] |= load_file(str(f))
    return models


def test_fine_tunes_have_the_requested_scale_and_correlation(tmp_path: Path) -> None:
    sizes = replace(MICRO, hidden=64, intermediate=256, vocab=512, shard_bytes=10**9)
    family = make_family.Family(sizes, fine_tunes=3, rho=0.5, noise=0.05, dtype="float32")
    models = _models(make_family.ensure_family(family, tmp_path / "f"), family)
    name = "model.layers.0.mlp.up_proj.weight"  # 16k elements, std 0.02
    base = models["base"][name].double()
    deltas = [(models[m][name].double() - base).reshape(-1) for m in ("ft1", "ft2", "ft3")]
    assert models["base"][name].dtype == torch.float32
    assert abs(float(base.std()) - 0.02) < 0.001
    for d in deltas:
        assert abs(float(d.std()) - 0.02 * 0.05) < 0.0001
    for a, b in ((0, 1), (0, 2), (1, 2)):
        cos = float(deltas[a] @ deltas[b] / (deltas[a].norm() * deltas[b].norm()))
        assert abs(cos - 0.5) < 0.03, cos
    norm = models["base"]["model.norm.weight"]
    assert abs(float(norm.mean()) - 1.0) < 0.03


def test_sparse_checkpoints_have_headers_and_holes(tmp_path: Path) -> None:
    specs = make_family.tensor_specs(replace(MICRO, shard_bytes=10**9))
    make_family.write_checkpoints([tmp_path], specs, 10**9, fill=None)
    (shard,) = tmp_path.glob("*.safetensors")
    tensors = load_file(str(shard))
    assert set(tensors) == {s.name for s in specs}
    assert all(not t.any() for t in tensors.values())


# ---------------------------------------------------------------- compare
def bf16(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.bfloat16)


def test_agreement_counts_ulps_across_zero() -> None:
    a = bf16(1.0, 0.0, 1.0)
    b = torch.stack([a[0], -a[1], compare.from_key(compare.ordered_key(a[2:]) + 2)[0]])  # equal, ±0, 2 ulps up
    agreement = compare.Agreement()
    agreement.add(a, b)
    assert (agreement.elements, agreement.bitwise_equal, agreement.within_1ulp, agreement.max_ulps) == (3, 2, 2, 2)
    assert agreement.max_abs == 2 * 2.0**-7


def test_exactness_classifies_misses() -> None:
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    exact = torch.tensor([1.0 + ulp / 4, 1.0 + ulp / 2, 1.0 + ulp / 2, 1.0 + ulp / 4, 1.0, 1e-11], dtype=torch.float64)
    got = bf16(1.0, 1.0, 1.0 + ulp, 1.0 + ulp, 1.0 + 2 * ulp, -1e-11)
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    e = compare.Exactness()
    e.add(got, exact, scale)
    # correct, a tie rounded to even, the other side of that tie, 1 ulp off, 2 off, a cancellation (±1e-11)
    counts = (e.elements, e.correct, e.ties, e.wrong_at_tie, e.wrong_1ulp, e.wrong_more, e.cancellation)
    assert counts == (6, 2, 2, 1, 1, 1, 1)


def test_round_bf16_is_correct_rounding() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = compare.round_bf16(x)
    for value, rounded in zip(x[:2000].tolist(), got[:2000].tolist(), strict=True):
        exp = math.frexp(value)[1]
        step = Fraction(2) ** (exp - 8)  # bf16 keeps 8 significant bits
        q, r = divmod(Fraction(value), step)
        q += 1 if r * 2 > step or (r * 2 == step and q % 2) else 0
        assert Fraction(rounded) == q * step


def test_reference_blocks_equal_the_whole_tensor(tmp_path: Path) -> None:
    family = make_family.Family(replace(MICRO, vocab=300, shard_bytes=10**9), seed=2)
    out = make_family.ensure_family(family, tmp_path / "f")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {out / 'base'}\nmodels:\n"
        f"  - {{model: {out / 'ft1'}, parameters: {{weight: 0.7}}}}\n"
        f"  - {{model: {out / 'ft2'}, parameters: {{weight: 0.3}}}}\ndtype: bfloat16\n"
    )
    with compare.Reader() as reader:
        ref = RecipeReference(recipe, reader)
        assert ref.elementwise
        whole, _ = ref("lm_head.weight")
        blocks = torch.cat([ref("lm_head.weight", slice(i, i + 100))[0] for i in range(0, 300, 100)])
        assert torch.equal(whole, blocks)
        get = lambda m: reader.get(out / m, "lm_head.weight").double()  # noqa: E731
        expected = get("base") + (7 * (get("ft1") - get("base")) + 3 * (get("ft2") - get("base"))) / 10
        assert torch.equal(whole, expected)
        same = compare.compare(out / "ft1", out / "ft1", ref, ["lm_head.weight"], reader)
    assert same.agreement.bitwise_equal == same.agreement.elements == sum(s.numel for s in family.specs())
    assert same.exact_tensors == ["lm_head.weight"] and same.exact_a.elements == 300 * 16


# ---------------------------------------------------------------- running and measuring
def test_interleave_alternates_and_skips_failures(tmp_path: Path) -> None:
    order = tmp_path / "order"

    def job(label: str, code: int = 0) -> Job:
        script = f"open({str(order)!r}, 'a').write({label!r} + ' '); raise SystemExit({code})"
        return Job(label, [sys.executable, "-c", script])

    groups = [[job("a"), job("b")], [job("c"), job("d", code=3)]]
    rounds = interleave(groups, 2, tmp_path / "logs", alternate=True, skip_failed=True)
    # round 1: group 0 as is, group 1 reversed; round 2 the other way round; d failed and was dropped
    assert order.read_text().split() == ["a", "b", "d", "c", "b", "a", "c"]
    assert rounds.skipped == {"d": "exit 3: no output"}
    assert [len(rounds.runs[x]) for x in "abcd"] == [2, 2, 2, 0]
    s = summarize(rounds.runs["a"])
    assert s["n"] == 2 and s["wall_median"] > 0 and s["peak_rss_max"] > 1e6 and s["minor_faults_median"] > 0
    with pytest.raises(SystemExit, match="d failed"):
        interleave(groups, 1, tmp_path / "logs")


def test_parse_importtime() -> None:
    stderr = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   yaml.error\n"
        "import time:       250 |        350 | yaml\n"
        "import time:        50 |       3000 |     mergekitlite.methods\n"
        "import time:      2000 |       5000 | torch\n"
        "something else\n"
    )
    imports = startup.parse_importtime(stderr)
    assert [(i.name, i.self_us, i.cumulative_us) for i in imports][:2] == [("yaml.error", 100, 100), ("yaml", 250, 350)]
    assert [i.name for i in startup.heaviest(imports, 2)] == ["torch", "mergekitlite.methods"]


def test_snapshot_of_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "WORK", tmp_path / "work")
    (tmp_path / "src" / "mergekitlite" / "__pycache__").mkdir(parents=True)
    (tmp_path / "src" / "mergekitlite" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "src" / "mergekitlite" / "__pycache__" / "junk.pyc").write_text("")
    root, desc = harness.snapshot(str(tmp_path / "src"))
    assert (root / "mergekitlite" / "__init__.py").read_text() == "X = 1\n"
    assert not (root / "mergekitlite" / "__pycache__").exists()
    assert root.name in desc and "not a git checkout" in desc
    assert harness.snapshot(str(tmp_path / "src"))[0] == root  # same content, same digest
    with pytest.raises(SystemExit, match="neither a folder"):
        harness.snapshot("no-such-revision-here")


def test_count() -> None:
    assert [harness.count(t) for t in ("64K", "4m", "1G", "123")] == [65536, 4 << 20, 1 << 30, 123]


# ---------------------------------------------------------------- tiebreak
def ranked_window(key: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Ranks [lo, hi), largest first, equal values by lowest index: a stable sort of the negated keys."""
    order = torch.argsort(-key, stable=True)
    mask = torch.zeros(key.numel(), dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask


def test_window_mask_is_the_stable_ranking() -> None:
    g = torch.Generator().manual_seed(1)
    key = torch.randint(0, 6, (997,), generator=g).float()  # six values: every threshold splits a tie
    for lo, hi in [(0, 1), (0, 498), (0, 996), (9, 906), (0, 0), (0, 997), (100, 997)]:
        mask, thresholds = tiebreak.window_mask(key, lo, hi)
        assert torch.equal(mask, ranked_window(key, lo, hi)), (lo, hi)
        kept = key[mask]
        assert all(t in (kept.min().item(), kept.max().item()) for t in thresholds)


def test_window_follows_mergekits_arithmetic() -> None:
    assert tiebreak.window("ties", 1000, 0.5, 0.0) == (0, 500)
    assert tiebreak.window("ties", 3, 0.1, 0.0) == (0, 1)  # mergekit keeps at least one
    # Breadcrumbs: keep 900 after dropping the 10 largest, so the 90 smallest go; with γ too large for the
    # density, fewer of the largest are dropped.
    assert tiebreak.window("breadcrumbs", 1000, 0.9, 0.01) == (10, 910)
    assert tiebreak.window("breadcrumbs", 1000, 0.95, 0.1) == (50, 1000)


@pytest.mark.parametrize("job", tiebreak.JOBS, ids=lambda j: j.slug)
def test_our_masks_are_the_definition(job: tiebreak.Job) -> None:
    # bf16 fine-tunes a few ulps from their base: the deltas tie as on real checkpoints.
    g = torch.Generator().manual_seed(2)
    base16 = (torch.randn(37, 29, generator=g) * 0.02).to(torch.bfloat16)
    models16 = [(base16.float() + torch.randn(37, 29, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(2)]
    t = tiebreak.Loaded("w", base16, models16)
    exact, _, _ = tiebreak.rank_keys(job, t)
    for mine, key in zip(tiebreak.our_masks(job, t.base, t.models), exact, strict=True):
        expected, thresholds = tiebreak.definition(job, key)
        assert torch.equal(mine, expected)
        assert tiebreak.tie_count(key, thresholds)[0] > 1
