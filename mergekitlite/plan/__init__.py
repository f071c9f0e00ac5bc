"""From a validated recipe and the models' headers to a tensor-level task graph, reading no weights.

The stages, each a function a test can call alone:

1. ``inputs.open_recipe_sources``   the models the recipe names, indexed from their headers
2. ``layout.normalize``             the recipe as slices (a ``models:`` recipe is one slice over whole models)
   ``layout.enumerate_outputs``     every output tensor and the input tensors that feed it
3. ``tensors.plan_tensor``          per tensor: inputs, shape and row rules, take / copy / merge, parameters
4. ``finish.size_chunks``           rows per chunk from the memory budget, seeds of random methods
   ``finish.layout_shards``         the output shards
   ``finish.output_config``         config.json of the output

Every problem found on the way is collected and raised together as one ``PlanError`` before anything
is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mergekitlite.budget import Budget
from mergekitlite.io.safetensors_header import CODE_BY_NAME
from mergekitlite.methods import get_method
from mergekitlite.options import DEFAULT_SHARD_SIZE
from mergekitlite.plan.finish import (
    donors,
    layout_shards,
    output_config,
    plan_seed,
    size_chunks,
)
from mergekitlite.plan.inputs import open_recipe_sources
from mergekitlite.plan.layout import complete, enumerate_outputs, normalize, reference_model
from mergekitlite.plan.params import gradients_without_layers
from mergekitlite.plan.problems import Problems
from mergekitlite.plan.rowrules import eos_warnings
from mergekitlite.plan.tensors import TensorContext, plan_tensor
from mergekitlite.plan.vocab import output_vocab
from mergekitlite.recipe import LoadedRecipe
from mergekitlite.taskgraph import Plan
from mergekitlite.tokens import read_token_info

__all__ = ["DEFAULT_SHARD_SIZE", "build_plan"]


def build_plan(
    loaded: LoadedRecipe,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard_params: int | None = None,
    compute_dtype: str | None = None,
    budget: Budget | None = None,
    random_seed: int | None = None,
    aliases: Mapping[str, Path] | None = None,
) -> Plan:
    """Plan the merge of ``loaded``; raises PlanError listing every problem found."""
    recipe = loaded.recipe
    spec = get_method(recipe.merge_method)
    sources = open_recipe_sources(recipe, loaded.base_dir, aliases)
    slices = normalize(recipe, spec, sources)
    reference = sources[reference_model(recipe, slices)]
    config_donor, tokenizer_donor = donors(recipe, slices)

    problems = Problems()
    for line in gradients_without_layers(recipe, sources, reference):
        problems.add(line)
    merged = list(dict.fromkeys(src.model for slc in slices for src in slc.sources))
    vocab, vocab_notes = output_vocab(recipe, sources, merged, config_donor, problems)
    ctx = TensorContext(
        recipe=recipe,
        spec=spec,
        sources=sources,
        reference=reference,
        tokenizer_donor=tokenizer_donor,
        tokens=read_token_info(sources[tokenizer_donor].path),
        out_dtype=CODE_BY_NAME[recipe.out_dtype_name] if recipe.out_dtype_name else None,
        vocab=vocab,
    )
    enumerated = enumerate_outputs(recipe, slices, sources, reference)
    layout, left_out = complete(enumerated, recipe, sources, reference, problems)
    planned = [plan_tensor(slot, ctx, problems) for slot in layout.slots]
    problems.raise_if_any()

    tasks = [p.task for p in planned if p is not None]
    warnings = [*loaded.warnings, *(p.note for p in planned if p is not None and p.note)]
    warnings += vocab_notes + left_out
    warnings += eos_warnings(recipe, sources, tokenizer_donor)

    budget = budget or Budget()
    cdtype = compute_dtype or recipe.compute_dtype
    seed = plan_seed(loaded, random_seed)
    tasks = size_chunks(tasks, cdtype, budget, seed)
    shards, shard_of = layout_shards(tasks, shard_size, shard_params)
    return Plan(
        loaded=loaded,
        sources=sources,
        tasks=tuple(tasks),
        shards=shards,
        shard_of=shard_of,
        compute_dtype=cdtype,
        config_donor=config_donor,
        tokenizer_donor=tokenizer_donor,
        out_config=output_config(
            sources[config_donor], tasks, recipe.out_dtype_name, layout.layers, layout.module_layers
        ),
        budget=budget,
        random_seed=seed,
        warnings=tuple(warnings),
        vocab=vocab,
    )
