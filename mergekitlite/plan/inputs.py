"""Stage 1 — the models a recipe names, opened (header-only), and the lookup of one tensor in one of them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mergekitlite.errors import PlanError
from mergekitlite.io.safetensors_header import TensorInfo
from mergekitlite.recipe import Recipe
from mergekitlite.roles import Role, find, role_of
from mergekitlite.sources import ModelSource, open_sources


def tokenizer_choice(recipe: Recipe) -> str | None:
    """What the recipe says about the tokenizer's source: None, 'base', 'union' or a model."""
    return recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source


def open_recipe_sources(
    recipe: Recipe, base_dir: Path, aliases: Mapping[str, Path] | None = None
) -> dict[str, ModelSource]:
    """Every model the recipe names (and its tokenizer source), indexed from headers; raises one PlanError
    listing every model that cannot be found or read."""
    sources, missing = open_sources(recipe.referenced_models(), base_dir, aliases)
    tok = tokenizer_choice(recipe)
    if tok not in (None, "base", "union") and tok not in sources:
        more, errs = open_sources([tok], base_dir, aliases)
        sources.update(more)
        missing += errs
    if missing:
        raise PlanError(missing)
    return sources


def lookup_tensor(src: ModelSource, name: str) -> TensorInfo | None:
    """The tensor ``name`` of ``src``, following tied embeddings for a missing output head."""
    if name in src.tensors:
        return src.tensors[name]
    if role_of(name) is Role.HEAD and src.tied_embeddings:
        emb = find(src.tensors, Role.EMBEDDING, vocab_size=src.config_value("vocab_size"))
        if emb is not None:
            return src.tensors[emb]
    return None
