"""``diff --png``: the layer × module heatmap of a ``DiffResult``.

One panel per metric. Each panel reads top to bottom like the model: the tensors before the layers
(token embedding), the layers (x = module, y = layer, layer 0 at the top), the tensors after them (final
norm, lm_head). Every relative-norm panel shares one colour scale, from 0 to the largest value (never
less than ``NOISE_FLOOR``, so float rounding between identical models stays the colour of 0); the cosine
panel is on its own fixed −1 … 1 scale; hatched cells are undefined (a zero delta or reference). Cells carry
their numbers while there is room for them (up to ``ANNOTATED_LAYERS`` layers).

matplotlib's object API (``Figure`` + Agg canvas) is used, so no global pyplot state or backend is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekitlite.cli.labels import module_labels
from mergekitlite.errors import MergekitliteError

if TYPE_CHECKING:
    from mergekitlite.diff import DiffResult, TensorDelta

NOISE_FLOOR = 1e-6  # relative differences below this are rounding, not a change: the scale's smallest top
ANNOTATED_LAYERS = 24  # at most this many layers get numbers in their cells
UNDEFINED = "white"  # and hatched: no colour map uses hatching


def short_number(value: float | None, metric: str) -> str:
    """A cell's number in at most 5 characters: 0.012, 0.5, 3e-05, -0.93 (cosine), — (undefined)."""
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "inf"
    if metric == "cosine":
        return f"{value:.2f}"
    if value == 0.0:
        return "0"
    return f"{value:.2g}" if abs(value) >= 0.01 else f"{value:.0e}"


def _values(result: DiffResult, metric: str) -> list[float]:
    return [v for t in result.tensors if (v := getattr(t, metric)) is not None and math.isfinite(v)]


def _text_colour(rgba: tuple[float, ...]) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _cells(ax: Any, grid: list[list[float]], cmap: Any, norm: Any, texts: list[list[str]] | None, size: float) -> None:
    """Draw ``grid``; hatch the undefined (NaN) cells; write ``texts`` in the cells in a colour that reads."""
    from matplotlib.patches import Rectangle

    ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if math.isnan(value):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.6", lw=0))
            if texts is not None:
                shade = cmap(norm(value)) if not math.isnan(value) else (1.0, 1.0, 1.0, 1.0)
                ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=size, color=_text_colour(shade))


def _strip(ax: Any, tensors: list[TensorDelta], labels: dict[str, str], metric: str, cmap: Any, norm: Any) -> None:
    """One row of cells for the tensors outside the layers, each with its name and number."""
    grid = [[_number(getattr(t, metric)) for t in tensors]]
    texts = [[f"{labels[t.name]}\n{short_number(getattr(t, metric), metric)}" for t in tensors]]
    _cells(ax, grid, cmap, norm, texts, 8)
    ax.set_xticks([])
    ax.set_yticks([])


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def plot_heatmap(result: DiffResult, path: Path) -> None:
    """Write ``result``'s heatmap to ``path`` (PNG)."""
    fig = heatmap_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def heatmap_figure(result: DiffResult) -> Any:
    """The heatmap as a matplotlib ``Figure`` (see the module docstring for its layout)."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise MergekitliteError("--png needs matplotlib: pip install 'mergekitlite[plot]'") from None
    layers, modules = result.layers(), result.modules()
    if not layers:
        raise MergekitliteError("--png: the models have no layer tensors to plot")
    before, after = result.before(), result.after()
    strip_labels = module_labels([t.name for t in before + after])
    labels = module_labels(modules)
    metrics = result.metrics
    relative = [m for m in metrics if m != "cosine"]
    top = max([*(v for m in relative for v in _values(result, m)), NOISE_FLOOR])
    shared = Normalize(0.0, top)  # the one scale of every relative-norm panel
    scales = {m: shared for m in relative} | {"cosine": Normalize(-1.0, 1.0)}
    cmaps = {m: colormaps["viridis"].with_extremes(bad=UNDEFINED) for m in relative}
    cmaps["cosine"] = colormaps["coolwarm"].with_extremes(bad=UNDEFINED)

    row_height = 0.4 if len(layers) <= 16 else 0.2
    rows = ([("before", 0.55)] if before else []) + [("layers", row_height * len(layers))]
    rows += [("after", 0.55)] if after else []
    panel_width = max(4.5, 0.62 * len(modules) + 1.6)
    height = sum(h for _, h in rows) + 3.2  # titles, module names, the scale note
    fig = Figure(figsize=(panel_width * len(metrics) + 1.2, height), layout="constrained")
    FigureCanvasAgg(fig)
    grid_spec = fig.add_gridspec(len(rows), len(metrics), height_ratios=[h for _, h in rows])
    panels: dict[str, list[Any]] = {m: [] for m in metrics}
    annotate = len(layers) <= ANNOTATED_LAYERS
    for col, (metric, title) in enumerate(metrics.items()):
        cmap, norm = cmaps[metric], scales[metric]
        for r, (kind, _) in enumerate(rows):
            ax = fig.add_subplot(grid_spec[r, col])
            panels[metric].append(ax)
            if kind != "layers":
                _strip(ax, before if kind == "before" else after, strip_labels, metric, cmap, norm)
                if col == 0:
                    ax.set_ylabel("before\nlayers" if kind == "before" else "after\nlayers", rotation=0, ha="right")
                continue
            grid = result.grid(metric)
            texts = [[short_number(v, metric) for v in row] for row in grid] if annotate else None
            _cells(ax, grid, cmap, norm, texts, 7 if len(modules) > 8 else 8)
            ax.set_xticks(range(len(modules)), [labels[m] for m in modules], rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), layers, fontsize=8 if len(layers) <= 32 else 6)
            ax.set_ylabel("layer")
        panels[metric][0].set_title(title)
    rel_axes = [ax for m in relative for ax in panels[m]]
    bar = fig.colorbar(ScalarMappable(norm=shared, cmap=cmaps[relative[0]]), ax=rel_axes, shrink=0.8)
    bar.formatter = FuncFormatter(lambda v, _: short_number(v, relative[0]))  # 2e-06, not an offset "1e-6" on top
    if "cosine" in metrics:
        fig.colorbar(ScalarMappable(norm=scales["cosine"], cmap=cmaps["cosine"]), ax=panels["cosine"], shrink=0.8)
    names = [f"A = {result.a}", f"B = {result.b}"] + ([f"base = {result.base}"] if result.base else [])
    if result.identical():
        names.append("identical: every relative difference is 0" if not result.base else "both deltas are 0")
    fig.suptitle("\n".join(names), fontsize=9, ha="left", x=0.01, parse_math=False)  # paths may hold "$"
    scale = f"colour scale 0 … {top:.3g}"
    if len(relative) > 1:
        scale = f"one colour scale for the {len(relative)} relative-norm panels, 0 … {top:.3g}"
    if "cosine" in metrics:
        scale += "; cosine −1 … 1"
    fig.supxlabel(f"{scale}; hatched: undefined (zero delta or reference)", fontsize=8)
    return fig
