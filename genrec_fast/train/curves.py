"""The ``curves.png`` every training stage writes: one panel per statistic that has data, drawn by Agg.

A panel is ``(title, {line label: [(step, value), ...]})``; :func:`plot_panels` draws the panels that have at
least one point (up to 4 per row, 5 x 4 inches each) with a matplotlib Figure (no pyplot, no global backend)
and writes the PNG atomically. :func:`post_training_panels` chooses the panels of an S-DPO / GRPO run.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Points = List[Tuple[float, float]]
Panel = Tuple[str, Dict[str, Points]]

PANELS_PER_ROW = 4
# logged beside the statistics, not one of them
NOT_PLOTTED = ("step",)


def panels_with_data(panels: Sequence[Panel]) -> List[Panel]:
    """The panels with at least one point, each keeping only its lines that have points."""
    kept = []
    for title, lines in panels:
        lines = {label: pts for label, pts in lines.items() if pts}
        if lines:
            kept.append((title, lines))
    return kept


def plot_panels(panels: Sequence[Panel], path: Union[str, Path], title: str) -> Path:
    """PNG of ``panels`` (those with data; a figure saying "nothing logged yet" when none has) at ``path``: a
    panel with one line has it as its y label, one with several a legend."""
    panels = panels_with_data(panels)
    ncols = max(1, min(len(panels), PANELS_PER_ROW))
    nrows = max(1, math.ceil(len(panels) / PANELS_PER_ROW))
    fig = Figure(figsize=(5 * ncols, 4 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, lines) in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        for label, pts in lines.items():
            ax.plot(*zip(*pts), lw=1, marker="o" if len(pts) < 20 else None, label=label)
        ax.set_title(f"{title}: {name}")
        if len(lines) > 1:
            ax.legend()
        else:
            ax.set_ylabel(next(iter(lines)))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, f"{title}: nothing logged yet", ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def post_training_panels(log: Sequence[Mapping[str, float]], before: Optional[Mapping[str, Any]] = None,
                         after: Optional[Mapping[str, Any]] = None, last_step: int = 0) -> List[Panel]:
    """The panels of a post-training run: one per statistic of its log rows (every key but ``step``, in the
    order they first appear), then "eval NDCG@10" with each eval split's NDCG@10 before (step 0) and after
    (``last_step``) training when it was evaluated."""
    names: Dict[str, None] = {}
    for row in log:
        names.update((k, None) for k in row if k not in NOT_PLOTTED)
    panels: List[Panel] = [(name, {name: [(row["step"], row[name]) for row in log if name in row]})
                           for name in names]
    evals: Dict[str, Points] = {}
    for step, res in ((0, before or {}), (last_step, after or {})):
        for split, metrics in res.items():
            if "NDCG@10" in metrics:
                evals.setdefault(f"{split} NDCG@10", []).append((step, metrics["NDCG@10"]))
    panels.append(("eval NDCG@10", evals))
    return panels_with_data(panels)
