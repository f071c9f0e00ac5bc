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


def test_a_native_linear_merge_imports_no_torch(tmp_path):
    """The shipped task-arithmetic recipe merges through the native kernel: no torch, and the same bytes
    as the torch path (``--no-native``) gives."""
    from mergekitlite.methods import native

    if not native.available():
        pytest.skip("the native kernel is not built here")
    fast = probe("merge", "recipes/demo.yaml", str(tmp_path / "native"), "--no-hash", "-q")
    assert fast["code"] == 0
    assert fast["torch"] is False, f"torch imported by {fast['importer']}"
    slow = probe("merge", "recipes/demo.yaml", str(tmp_path / "torch"), "--no-hash", "-q", "--no-native")
    assert slow["code"] == 0 and slow["torch"] is True
    for f in sorted((tmp_path / "native").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "torch" / f.name).read_bytes(), f.name


def test_a_merge_that_computes_with_torch_imports_it(tmp_path):
    """The other side of the line: a statistic method computes with torch (so the probe above can tell)."""
    recipe = tmp_path / "ties.yaml"
    demo = ROOT / "demo" / "models"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {demo / 'base'}\nmodels:\n"
        f"  - model: {demo / 'chat'}\n    parameters: {{weight: 1.0, density: 0.5}}\ndtype: bfloat16\n"
    )
    report = probe("merge", str(recipe), str(tmp_path / "out"), "--no-hash", "-q")
    assert report["code"] == 0 and report["torch"] is True
