"""Shared fixtures: an isolated hash cache for every test, tiny model families built once per session,
and a helper to write recipes."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import builders


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_session(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide default, so that module- and session-scoped fixtures (set up before any
    function-scoped fixture) never hash into ~/.cache either."""
    old = os.environ.get("MERGEKITLITE_CACHE")
    os.environ["MERGEKITLITE_CACHE"] = str(tmp_path_factory.mktemp("mkl-cache-session"))
    yield
    if old is None:
        os.environ.pop("MERGEKITLITE_CACHE", None)
    else:
        os.environ["MERGEKITLITE_CACHE"] = old


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The input-hash cache lives in a temporary folder: tests never touch ~/.cache."""
    cache = tmp_path_factory.mktemp("mkl-cache")
    monkeypatch.setenv("MERGEKITLITE_CACHE", str(cache))
    return cache


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe(text, name='recipe.yaml') → path of a recipe file in tmp_path (text is dedented)."""

    def write(text: str, name: str = "recipe.yaml", folder: Path | None = None) -> Path:
        p = (folder or tmp_path) / name
        p.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return p

    return write


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untied bf16 Llama, 3 layers: base, a, b."""
    return builders.make_family(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def llama_tied_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tied-embedding bf16 Llama (no lm_head in the files), 5 layers: base, a, b."""
    return builders.make_family(tmp_path_factory.mktemp("llama-tied"), "llama", seed=2, tied=True, layers=5)


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return builders.make_family(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=3, layers=4)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 GPT-2 (``transformer.h.N``), tied, 3 layers."""
    return builders.make_family(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=4, dtype=torch.float32)
