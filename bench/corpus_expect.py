"""What mergekit does with each config of the compatibility corpus (offline; not run by CI).

For every ``tests/corpus/configs/<slug>.yml``: build the stand-ins with the builder the test uses
(``tests/corpus/standins.py``), run mergekit on the file unchanged (``mergekit-yaml``, or
``mergekit-multi`` for multi-document files) with the stand-ins in a private, offline Hugging Face
cache, and write ``tests/corpus/expected/<slug>.json``: accepted or refused (with its error line),
and for accepted ones the output's tensors (shape, dtype), layer count and tokenizer files. Also
rewrites the index ``tests/corpus/SOURCES.md``.

    .venv/bin/python bench/corpus_expect.py --mergekit-bin /work/mkvenv/bin [-j 2] [SLUG ...]

The stand-ins are built by this interpreter (the project's, so with the same transformers as the test);
mergekit runs from its own virtual environment, given by ``--mergekit-bin``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "corpus"))

import standins

# mergekit 0.1.5 asks the hub API for a repository's file list before it reads a hub model, even when the
# model is in the cache (mergekit/common.py, ModelReference.local_path), and asks whether a local folder
# is also a hub repository when it writes the model card (mergekit/card.py, is_hf); offline both calls
# raise. This file, put on mergekit's PYTHONPATH only, answers those two calls from the cache, so that
# mergekit is judged on the config and not on being offline. Nothing else in mergekit changes.
_SITECUSTOMIZE = """
import os
import huggingface_hub

_list_repo_files = huggingface_hub.list_repo_files


def list_repo_files(repo_id, *args, revision=None, **kwargs):
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        return sorted(os.listdir(path))
    return _list_repo_files(repo_id, *args, revision=revision, **kwargs)


def repo_exists(repo_id, *args, **kwargs):
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            huggingface_hub.snapshot_download(repo_id, local_files_only=True)
        except Exception:
            return False
        return True
    return _repo_exists(repo_id, *args, **kwargs)


_repo_exists = huggingface_hub.repo_exists
huggingface_hub.list_repo_files = list_repo_files
huggingface_hub.repo_exists = repo_exists
"""

_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)|[\w.]+Error)\b.*")


def error_line(stderr: str) -> str:
    """The line that says why mergekit stopped: the last exception line of its traceback, else the
    last non-empty line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXC_LINE.match(ln):
            return ln[:400]
    return (lines[-1] if lines else "(no output)")[:400]


def mergekit_version(bin_dir: Path) -> str:
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def run_one(config: Path, bin_dir: Path, builder: standins.StandIns, scratch: Path) -> dict:
    work = scratch / config.stem
    shutil.rmtree(work, ignore_errors=True)
    hub, cwd = work / "hub", work / "cwd"
    cwd.mkdir(parents=True)
    placed = builder.lay_out(config, hub, cwd)
    out = work / "out"
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_CACHE": str(hub),
            "HF_HOME": str(work / "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": str(scratch / "shim"),
        }
    )
    # The LoRA cache is a command-line option, not part of the config: given, so that `model+lora`
    # configs are judged on what they say.
    common = ["--lora-merge-cache", str(work / "lora-cache")]
    docs = standins.documents(config)
    if len(docs) > 1:
        last_name = docs[-1].get("name") if isinstance(docs[-1], dict) else None
        cmd = [str(bin_dir / "mergekit-multi"), str(config), "--intermediate-dir", str(work / "steps"), *common]
        if not last_name:
            cmd += ["--out-path", str(out)]
        else:
            out = work / "steps" / last_name
    else:
        cmd = [str(bin_dir / "mergekit-yaml"), str(config), str(out), *common]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    result: dict = {
        "slug": config.stem,
        "command": Path(cmd[0]).name,
        "exit_code": proc.returncode,
        "standins": standins.fingerprint(placed),
    }
    if proc.returncode == 0 and (out / "config.json").exists():
        result["accepted"] = True
        result.update(standins.describe_output(out))
    else:
        result["accepted"] = False
        result["error"] = error_line(proc.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return result


def write_sources(results: dict[str, dict], version: str) -> None:
    rows = []
    for cfg in standins.config_paths():
        source = cfg.read_text(encoding="utf-8").splitlines()[0].removeprefix("# source: ")
        feats = ", ".join(standins.features(cfg))
        r = results.get(cfg.stem) or json.loads((standins.EXPECTED / f"{cfg.stem}.json").read_text())
        verdict = "accepts" if r["accepted"] else "refuses"
        rows.append(f"| `{cfg.stem}` | {standins.method_of(cfg)} | {feats} | {verdict} | {source} |")
    text = (
        "# Compatibility corpus: sources\n\n"
        "Published mergekit configs, each saved verbatim under `configs/<slug>.yml` after a first comment line\n"
        "`# source: ...` (ours). `expected/<slug>.json` is what mergekit "
        f"{version} did with it on the stand-ins\n"
        "(`bench/corpus_expect.py`); `tests/test_corpus.py` holds our `merge` to that. Model cards mirrored in\n"
        "GitHub repositories are cited by repository, path and commit; the Hugging Face model is the one the\n"
        "card describes.\n\n"
        f"{len(rows)} configs. mergekit version: **{version}** (with transformers as in the project's venv).\n\n"
        "| slug | method | features | mergekit | source |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    (standins.CORPUS / "SOURCES.md").write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-bin", type=Path, default=Path("/work/mkvenv/bin"))
    ap.add_argument("-j", "--jobs", type=int, default=1)
    ap.add_argument("slugs", nargs="*")
    args = ap.parse_args()
    version = mergekit_version(args.mergekit_bin)
    configs = [c for c in standins.config_paths() if not args.slugs or c.stem in args.slugs]
    standins.EXPECTED.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="corpus-expect-") as tmp:
        builder = standins.StandIns(Path(tmp) / "standins")
        for c in configs:  # stand-ins first, in this thread: the builder is not thread-safe
            builder.lay_out(c, Path(tmp) / "warm" / c.stem / "hub", Path(tmp) / "warm" / c.stem / "cwd")
        shutil.rmtree(Path(tmp) / "warm")
        (Path(tmp) / "runs" / "shim").mkdir(parents=True)
        (Path(tmp) / "runs" / "shim" / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")

        def one(c: Path) -> dict:
            r = run_one(c, args.mergekit_bin, builder, Path(tmp) / "runs")
            r["mergekit_version"] = version
            (standins.EXPECTED / f"{c.stem}.json").write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
            print(f"{c.stem}: {'accepted' if r['accepted'] else 'refused: ' + r['error']}", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for r in pool.map(one, configs):
                results[r["slug"]] = r
    if not args.slugs:
        write_sources(results, version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
