"""What the commands print: user text (paths, recipe positions, token texts) exactly as it is, never as
rich markup or emoji codes; tables that read at 80 columns (``methods``; eval's model labels)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mergekitlite.cli import main, merge_main
from mergekitlite.cli.cmd_eval import legend, results_table
from mergekitlite.cli.cmd_recipes import methods_table
from mergekitlite.cli.console import make_console, warn
from mergekitlite.cli.labels import module_labels, path_labels
from mergekitlite.evaluate import EvalReport, ModelResult
from mergekitlite.methods import REGISTRY


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def rendered(*items, width: int = 80) -> str:
    console = make_console(width=width)
    with console.capture() as cap:
        for item in items:
            console.print(item)
    return cap.get()


def test_recipe_positions_are_not_emoji_codes(llama_family, write_recipe, tmp_path, capsys):
    """``file:100:19`` holds the emoji code ``:100:``: it must reach the terminal unchanged."""
    text = "#\n" * 99 + (
        "merge_method: task_arithmetic\n"
        f"base_model: {llama_family['base']}\n"
        "models:\n"
        f"  - model: {llama_family['a']}\n    paramters: {{weight: 1.0}}\n"
    )
    recipe = write_recipe(text)
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert f"{recipe}:104:5: models[0].paramters: unknown key" in out
    assert "💯" not in out

    recipe.write_text("#\n" * 99 + "merge_method: task_arithmatic\n", encoding="utf-8")
    assert merge_main([str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {recipe}:100:15: merge_method: unknown merge method 'task_arithmatic'" in err
    assert "💯" not in err


def test_warnings_print_user_text_literally():
    console = make_console(width=200)
    with console.capture() as cap:
        warn(console, ["model [bold]m[/bold] at x:100:y :smile:"])
    text = cap.get()
    assert text == "warning: model [bold]m[/bold] at x:100:y :smile:\n"


def test_paths_with_markup_and_emoji_codes_are_printed_as_they_are(tmp_path, capsys):
    import tiny_lm

    odd = tmp_path / "m[bold]:100:[/bold]"
    tiny_lm.random_lm(tmp_path / "plain", 1, tiny_lm.make_tokenizer())
    shutil.copytree(tmp_path / "plain", odd)
    assert main(["diff", str(odd), str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert f"A = {odd}" in out and "identical: every compared tensor is equal" in out
    assert main(["inspect", str(odd)]) == 0
    out = capsys.readouterr().out
    assert f"inspect: {odd}" in out and "💯" not in out


def test_methods_read_at_80_columns():
    text = rendered(methods_table(REGISTRY.methods), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "`" not in text
    names = [m.group(1) for line in lines if (m := re.match(r"^│ (\S+)\s+│", line))]
    # Every method's name is whole on its first line (never cut mid-word); aliases follow as "= alias".
    assert [n for n in names if not n.startswith("=")] == sorted(REGISTRY.methods)
    assert "│ = extract_delta" in text
    assert "task_arithmetic" in text and "weight*" in text


def test_eval_tables_label_models_by_short_unique_paths():
    names = ["merged/demo", "demo/models/continued", "demo/models/chat", "demo/models/base"]
    report = EvalReport(
        merged=names[0],
        settings={"end_token": "<|im_end|>", "end_token_id": 2, "chat_template_from": names[0]},
        models=[
            ModelResult(name=n, path=n, role="merged" if i == 0 else "parent", stop_ids=[2], perplexity=10.0 + i)
            for i, n in enumerate(names)
        ],
    )
    labels = path_labels(names)
    assert labels == dict(zip(names, ["demo", "continued", "chat", "base"]))
    text = rendered(results_table(report, labels), legend(report, labels), width=80)
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["demo", "continued", "chat", "base"]
    for name, label in labels.items():
        assert re.search(rf"^ {re.escape(label)}\s+{re.escape(name)}\s*$", text, re.M), (label, name)
    assert all(len(line) <= 80 for line in text.splitlines())


def test_labels_are_shortest_distinguishing_suffixes():
    assert path_labels(["a/x/model", "b/x/model", "c/other"]) == {
        "a/x/model": "a/x/model",
        "b/x/model": "b/x/model",
        "c/other": "other",
    }
    assert path_labels(["org/model@v2/", "model"]) == {"org/model@v2/": "model@v2", "model": "model"}
    assert path_labels(["x/model", "model"]) == {"x/model": "x/model", "model": "model"}
    assert module_labels(
        ["self_attn.q_proj.weight", "attn.c_proj.weight", "mlp.c_proj.weight", "attn.c_attn.bias"]
    ) == {
        "self_attn.q_proj.weight": "q_proj",
        "attn.c_proj.weight": "attn.c_proj",
        "mlp.c_proj.weight": "mlp.c_proj",
        "attn.c_attn.bias": "c_attn.bias",
    }


def test_example_recipes_validate(capsys):
    root = Path(__file__).resolve().parent.parent
    assert main(["validate", str(root / "recipes" / "demo.yaml")]) == 0
    assert capsys.readouterr().out == f"{root / 'recipes' / 'demo.yaml'}: ok\n"
