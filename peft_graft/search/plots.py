"""Pictures of a search: the sensitivity heat map (layer × module kind) and the growth curve (gain vs parameters).

matplotlib is imported when a plot is drawn, never at import: it is an optional dependency (the ``bench`` extra).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PlotDependencyError
from .sensitivity import SensitivityMap, check_score


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotDependencyError(
            "Drawing search plots needs matplotlib, which is not installed: pip install 'peft-graft[bench]' (or "
            "pip install matplotlib). The JSON reports are written without it."
        ) from err
    return plt


def heat_map(
    smap: SensitivityMap, path: str | os.PathLike, score: str = "projected", title: str | None = None
) -> Path:
    """Draw ``score`` of every in-layer module as a layer × module-kind grid (log colour scale) into ``path``."""
    check_score(score)
    plt = _pyplot()
    modules = [m for m in smap.modules if m.layer is not None]
    layers = sorted({m.layer for m in modules})
    kinds = list(dict.fromkeys(m.kind for m in modules))
    grid = [[math.nan] * len(kinds) for _ in layers]
    for m in modules:
        value = m.score(score)
        grid[layers.index(m.layer)][kinds.index(m.kind)] = math.log10(value) if value > 0 else math.nan
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.25 * len(layers)))
    image = axes.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(kinds)), [k.rpartition(".")[2] for k in kinds], rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    axes.set_title(title or f"sensitivity: {score} (log10)")
    figure.colorbar(image, ax=axes, label=f"log10 {score}")
    return _save(plt, figure, path)


def growth_curve(stages: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "Staged growth") -> Path:
    """Cumulative acceptance gain vs cumulative trainable parameters: accepted grafts stage by stage, and each
    stage's LoRA control at the same budget drawn from the point the stage started from.

    ``stages`` are the ``stages`` entries of a `SearchReport` dict.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    xs, ys = [0], [0.0]
    for stage in stages:
        start_x, start_y = xs[-1], ys[-1]
        control = stage.get("control")
        if control is not None:
            axes.plot(
                [start_x, start_x + control["params"]],
                [start_y, start_y + control["gain"]],
                "--o",
                color="tab:orange",
                label="LoRA control (same budget)" if stage is stages[0] else None,
            )
        if stage["decision"] == "ACCEPTED":
            xs.append(start_x + stage["params"])
            ys.append(start_y + stage["gain"])
    axes.plot(xs, ys, "-o", color="tab:blue", label="accepted grafts")
    axes.set_xlabel("trainable parameters (cumulative)")
    axes.set_ylabel("acceptance gain (nats/token, cumulative)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
