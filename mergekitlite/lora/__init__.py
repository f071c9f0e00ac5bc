"""LoRA adapters: ``model+adapter`` inputs applied while streaming, and ``extract-lora``.

* ``reference`` — telling a ``model+adapter`` reference from a model (no torch, used by recipe validation).
* ``config`` — an adapter's ``adapter_config.json``: what we apply, what we refuse, which modules it targets,
  each module's rank, alpha and scale.
* ``adapter`` — an adapter folder read from headers: its LoRA factors and full replacements, by module.
* ``tensor`` — ``AdaptedTensor``: a model tensor whose rows are produced on read (W + s·B·A in float32).
* ``source`` — a model with an adapter bound to it: the ``ModelSource`` a recipe's ``model+adapter`` opens to.
* ``rows`` — producing an adapted tensor's rows, chunk by chunk, bitwise independent of the chunking.
* ``extract`` — a PEFT adapter of the difference of two models, by truncated SVD tensor by tensor.

The submodules are imported where used: ``sources`` imports ``reference`` only (no import cycle).
"""
