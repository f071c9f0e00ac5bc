"""Start-up: building the command line imports no torch, so ``merge --help``, ``mergekitlite --help`` and
``--version`` answer at once; ``validate`` imports it only through the recipe's method registry (until
the methods are torch-free), never from the CLI layer itself. Each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from builders import subprocess_env

ROOT = Path(__file__).resolve().parent.parent

# Runs a command in-process and reports whether torch was imported and which file imported it first.
PROBE = """
import json, sys, traceback

first_importer = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not first_importer:
            frames = [f.filename for f in traceback.extract_stack()[:-1]]
            ours = [f for f in frames if "importlib" not in f and not f.startswith("<")]
            first_importer.append(ours[-1] if ours else "?")
        return None

sys.meta_path.insert(0, Watch())
from mergekitlite.cli import main, merge_main

argv = sys.argv[1:]
try:
    code = merge_main(argv[1:]) if argv[0] == "merge" else main(argv)
except SystemExit as exc:
    code = exc.code
report = {"code": code, "torch": "torch" in sys.modules, "importer": first_importer[0] if first_importer else None}
print("PROBE " + json.dumps(report), file=sys.stderr)
"""


def probe(*argv: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


@pytest.mark.parametrize(
    "argv",
    [
        ("merge", "--help"),
        ("--help",),
        ("--version",),
        ("plan", "--help"),
        ("eval", "--help"),
        ("diff", "--help"),
        ("inspect", "--help"),
    ],
    ids=" ".join,
)
def test_help_imports_no_torch(argv):
    report = probe(*argv)
    assert report["code"] == 0
    assert report["torch"] is False, f"torch imported by {report['importer']}"


def test_validate_does_not_import_torch_from_the_cli_layer():
    report = probe("validate", "recipes/demo.yaml")
    assert report["code"] == 0
    importer = report["importer"] or ""
    assert f"mergekitlite{'/'}cli{'/'}" not in importer.replace("\\", "/"), f"the CLI layer imports torch: {importer}"


def test_validate_imports_no_torch():
    report = probe("validate", "recipes/demo.yaml")
    assert report["code"] == 0
    assert report["torch"] is False, f"torch imported by {report['importer']}"
