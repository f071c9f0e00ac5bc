"""Compatibility corpus: published mergekit configs run unchanged and give the model mergekit gives.

Each ``tests/corpus/configs/<slug>.yml`` runs through ``merge`` (in process) on tiny stand-ins of the
models it names (``tests/corpus/standins.py``: the same builder ``bench/corpus_expect.py`` used when it
recorded what mergekit does in ``tests/corpus/expected/<slug>.json``). Where mergekit accepts a config,
ours must exit 0 with mergekit's tensor names, shapes, dtypes, layer count and tokenizer files; where
mergekit refuses it, ours must exit 2 with a one-line message. Cases that fail today because a feature
is missing are listed in ``KNOWN_GAPS`` as strict xfails: when the feature lands the case passes, the
xfail turns into a failure, and the entry must go.

``MERGEKITLITE_CORPUS_REPORT=1`` rewrites ``tests/corpus/REPORT.md`` (the tally) after the run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "corpus"))

import standins

from mergekitlite.cli import merge_main

# slug -> why ours fails today (the issue it waits on). Strict: a case that passes must leave the table.
_MOE = (
    "Mixtral experts: mergekit 0.1.5 under transformers 5 rewrites the experts into transformers 5's fused"
    " mlp.experts.gate_up_proj/down_proj; we keep the inputs' block_sparse_moe.experts.N.w1/w2/w3, which"
    " transformers 5 converts on load (a different file layout of the same model; README: Where we differ)"
)
KNOWN_GAPS: dict[str, str] = {
    "card-mixtral-8x7b-instruct-v0-1-limarp-zloss-dare-ties": _MOE,
    "card-open-gpt4-8x7b-v0-2": _MOE,
}

# Methods whose output mergekit 0.1.5 writes in float32 whatever the config's ``dtype`` says; we write the
# ``dtype`` asked for. The comparison allows exactly that difference for these methods (and no other).
FLOAT32_OUTPUT_METHODS = {
    "arcee_fusion": "mergekit returns the fused tensor in float32 and does not cast it to dtype",
}
_SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _allowed_dtype(config: Path, ours: str, theirs: str) -> bool:
    docs = [d for d in standins.documents(config) if isinstance(d, dict)]
    last = docs[-1] if docs else {}
    asked = _SAFETENSORS_DTYPE.get(str(last.get("out_dtype") or last.get("dtype")))
    return last.get("merge_method") in FLOAT32_OUTPUT_METHODS and theirs == "F32" and ours == asked


def _expected(slug: str) -> dict:
    return json.loads((standins.EXPECTED / f"{slug}.json").read_text(encoding="utf-8"))


def _cases() -> list:
    out = []
    for cfg in standins.config_paths():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[cfg.stem])] if cfg.stem in KNOWN_GAPS else []
        out.append(pytest.param(cfg, id=cfg.stem, marks=marks))
    return out


@pytest.fixture(scope="session")
def builder(tmp_path_factory: pytest.TempPathFactory) -> standins.StandIns:
    return standins.StandIns(tmp_path_factory.mktemp("corpus-standins"))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty Hugging Face cache, offline (huggingface_hub reads its environment at import,
    so its constants are patched too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _run_ours(config: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = merge_main([str(config), str(out), "--no-hash", "-q"])
    except SystemExit as e:  # argparse and friends
        code = int(e.code or 0)
    except Exception:  # an escaped exception is what the command reports as a bug: exit 1, a traceback
        return 1, capsys.readouterr().err + traceback.format_exc()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("config", _cases())
def test_config_runs_as_in_mergekit(config, builder, outcomes, offline_hub, tmp_path, monkeypatch, capsys):
    slug = config.stem
    expected = _expected(slug)
    work = tmp_path / "cwd"
    work.mkdir()
    placed = builder.lay_out(config, offline_hub, work)
    assert standins.fingerprint(placed) == expected["standins"], (
        f"{slug}: the stand-ins differ from those mergekit saw; rerun bench/corpus_expect.py"
    )
    capsys.readouterr()  # the builder's output is not ours
    monkeypatch.chdir(work)
    docs = standins.documents(config)
    last_name = docs[-1].get("name") if len(docs) > 1 and isinstance(docs[-1], dict) else None
    out = tmp_path / (last_name or "out")
    code, err = _run_ours(config, out, capsys)
    message = " ".join(err.split())
    outcomes[slug] = {"mergekit": expected["accepted"], "code": code, "message": message[:300]}

    if not expected["accepted"]:
        assert code == 2, f"{slug}: mergekit refuses ({expected['error']}); we exit {code}: {message[:500]}"
        assert err.strip().startswith("error:") and "Traceback" not in err, f"{slug}: not a user error:\n{err}"
        return

    assert code == 0, f"{slug}: mergekit accepts; we exit {code}: {message[:500]}"
    got = standins.describe_output(out)
    want = {k: expected[k] for k in ("tensors", "num_hidden_layers", "tokenizer_files")}
    assert sorted(got["tensors"]) == sorted(want["tensors"]), (
        f"{slug}: tensor names differ: only ours {sorted(set(got['tensors']) - set(want['tensors']))[:5]}, "
        f"only mergekit {sorted(set(want['tensors']) - set(got['tensors']))[:5]}"
    )
    shapes = {k: v[0] for k, v in got["tensors"].items()}
    assert shapes == {k: v[0] for k, v in want["tensors"].items()}, f"{slug}: shapes differ"
    dtypes = {k: v[1] for k, v in got["tensors"].items()}
    want_dtypes = {k: v[1] for k, v in want["tensors"].items()}
    want_dtypes = {k: dtypes[k] if _allowed_dtype(config, dtypes[k], v) else v for k, v in want_dtypes.items()}
    assert dtypes == want_dtypes, (
        f"{slug}: dtypes differ: ours {Counter(dtypes.values())}, mergekit {Counter(want_dtypes.values())}"
    )
    assert got["num_hidden_layers"] == want["num_hidden_layers"], f"{slug}: layer count differs"
    assert _template_placed_alike(got["tokenizer_files"], want["tokenizer_files"], out) == want["tokenizer_files"], (
        f"{slug}: tokenizer files: ours {got['tokenizer_files']}, mergekit {want['tokenizer_files']}"
    )


def _template_placed_alike(files: list[str], theirs: list[str], out: Path) -> list[str]:
    """Our tokenizer files as mergekit would list them: with a tokenizer source mergekit re-saves the tokenizer
    through transformers, which writes the chat template to chat_template.jinja; we copy the donor's files byte
    for byte, and a donor may keep its template inside tokenizer_config.json. The same template either way
    (README: "Where we differ")."""
    config = out / "tokenizer_config.json"
    inline = config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))
    moved = set(theirs) - set(files) == {"chat_template.jinja"}
    return sorted({*files, "chat_template.jinja"}) if inline and moved else files


def test_every_config_has_an_expectation_and_an_architecture():
    slugs = {c.stem for c in standins.config_paths()}
    assert len(slugs) >= 60
    assert slugs == {p.stem for p in standins.EXPECTED.glob("*.json")}
    assert slugs == set(standins.architectures())
    for c in standins.config_paths():
        assert c.read_text(encoding="utf-8").startswith("# source: "), c.name
    assert set(KNOWN_GAPS) <= slugs


@pytest.fixture(scope="session")
def outcomes() -> Iterator[dict[str, dict]]:
    """What each case did (for the tally); with MERGEKITLITE_CORPUS_REPORT=1, REPORT.md is rewritten from it."""
    collected: dict[str, dict] = {}
    yield collected
    if os.environ.get("MERGEKITLITE_CORPUS_REPORT") == "1" and collected:
        write_report(collected)


def write_report(outcomes: dict[str, dict]) -> None:
    configs = standins.config_paths()
    expected = {c.stem: _expected(c.stem) for c in configs}
    methods = Counter(standins.method_of(c) for c in configs)
    mk_ok = [s for s, e in expected.items() if e["accepted"]]
    ours_ok = [s for s, o in outcomes.items() if o["code"] == 0]
    same = [s for s in outcomes if s not in KNOWN_GAPS]
    lines = [
        "# Compatibility corpus: tally",
        "",
        "Regenerated by `MERGEKITLITE_CORPUS_REPORT=1 .venv/bin/python -m pytest tests/test_corpus.py`.",
        "",
        f"- configs: {len(configs)}",
        f"- mergekit {next(iter(expected.values()))['mergekit_version']} accepts: {len(mk_ok)}; refuses: "
        f"{len(configs) - len(mk_ok)}",
        f"- we accept (exit 0): {len(ours_ok)} of the {len(outcomes)} run; mergekit accepts and we give its model: "
        f"{sum(1 for s in mk_ok if s in outcomes and s not in KNOWN_GAPS)}; both refuse (we exit 2): "
        f"{sum(1 for s, o in outcomes.items() if not expected[s]['accepted'] and o['code'] == 2)}",
        f"- cases that behave as mergekit's (pass): {len(same)}; known gaps (strict xfail): {len(KNOWN_GAPS)}",
        "",
        "## By method",
        "",
        "| method | configs | mergekit accepts |",
        "|---|---:|---:|",
    ]
    for m, n in sorted(methods.items(), key=lambda kv: (-kv[1], kv[0])):
        acc = sum(1 for c in configs if standins.method_of(c) == m and expected[c.stem]["accepted"])
        lines.append(f"| {m} | {n} | {acc} |")
    lines += ["", "## Why mergekit refuses", "", "| slug | mergekit's error |", "|---|---|"]
    for s, e in sorted(expected.items()):
        if not e["accepted"]:
            lines.append(f"| `{s}` | {e['error'].replace('|', '/')[:200]} |")
    gaps = Counter(KNOWN_GAPS.values())
    lines += ["", "## Known gaps (ours differs today)", "", "| class | count | slugs |", "|---|---:|---|"]
    for reason, n in gaps.most_common():
        slugs = ", ".join(f"`{s}`" for s, r in sorted(KNOWN_GAPS.items()) if r == reason)
        lines.append(f"| {reason} | {n} | {slugs} |")
    lines += [
        "",
        "## Every case",
        "",
        "| slug | method | mergekit | ours (exit) | our message |",
        "|---|---|---|---:|---|",
    ]
    for s, o in sorted(outcomes.items()):
        cfg = standins.CONFIGS / f"{s}.yml"
        verdict = "accepts" if expected[s]["accepted"] else "refuses"
        msg = o["message"].replace("|", "/")[:160]
        lines.append(f"| `{s}` | {standins.method_of(cfg)} | {verdict} | {o['code']} | {msg} |")
    (standins.CORPUS / "REPORT.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
