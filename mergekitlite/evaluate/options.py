"""eval's options, declared once (``mergekitlite.options``): the ``eval`` command's flags are generated
from these fields. Imports no torch, so that ``mergekitlite --help`` does not either."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergekitlite.options import check_values, count_option, option, size_option


@dataclass(frozen=True)
class LoadOptions:
    """How each model is loaded."""

    device: str = option(
        "cpu",
        "--device",
        help="cpu (default), cuda, cuda:N, mps, or auto (accelerate places layers on GPU, CPU and disk)",
    )
    dtype: str = option(
        "auto",
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype when loading (default: the checkpoint's)",
    )
    max_ram: int | None = size_option(
        None,
        "--max-ram",
        help="RAM for weights, e.g. 24GB; the rest is offloaded to disk",
    )
    max_vram: int | None = size_option(
        None,
        "--max-vram",
        help="GPU memory for weights, e.g. 7GB; the rest stays in RAM or on disk",
    )
    offload_folder: Path | None = option(
        None,
        "--offload-folder",
        parse=Path,
        metavar="DIR",
        help="where offloaded weights go (default: a temporary folder)",
    )
    trust_remote_code: bool = option(
        False, "--trust-remote-code", help="allow models that ship their own Python code (Qwen-14B) to run it"
    )

    def __post_init__(self) -> None:
        check_values(self)

    @property
    def dispatched(self) -> bool:
        """Whether accelerate places the layers (``device_map="auto"``)."""
        return self.device == "auto" or self.max_ram is not None or self.max_vram is not None


@dataclass(frozen=True)
class EvalOptions:
    """What is measured, and on which text and prompts."""

    text: Path | None = option(
        None,
        "--text",
        parse=Path,
        metavar="FILE",
        help="UTF-8 text file for perplexity and KL (without it both are skipped)",
    )
    prompts: Path | None = option(
        None,
        "--prompts",
        parse=Path,
        metavar="FILE",
        help="YAML list of {prompt, reference} (default: the packaged Japanese+English set)",
    )
    max_prompts: int | None = count_option(None, "--max-prompts", help="use only the first N prompts")
    chat_template_from: str | None = option(
        None,
        "--chat-template-from",
        metavar="MODEL",
        help="model folder, .jinja file or built-in template name whose chat template renders the prompts "
        "(default: the merged model's, else the first parent's that has one)",
    )
    max_new_tokens: int = count_option(
        256,
        "--max-new-tokens",
        help="generation limit per prompt (default 256)",
    )
    max_length: int | None = count_option(
        None,
        "--max-length",
        help="perplexity window in tokens (default: the models' context, at most 2048)",
    )
    stride: int | None = count_option(
        None,
        "--stride",
        help="window step in tokens, less than the window (default: half the window)",
    )
    max_text_tokens: int | None = count_option(
        None,
        "--max-text-tokens",
        help="score only the first N tokens of --text",
    )
    kl_tokens: int = count_option(
        512,
        "--kl-tokens",
        help="text positions the KL is averaged over (default 512; memory: N × vocab floats)",
    )
    load: LoadOptions = field(default_factory=LoadOptions)

    def __post_init__(self) -> None:
        check_values(self)
