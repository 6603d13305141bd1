"""The PNG of a quality result: loss curves and the held-out loss of each arm.

Needs matplotlib (`pip install 'sla-tl[bench]'`), imported only here.
"""

from __future__ import annotations

import os

from ..plot import require_matplotlib
from .arms import ARM_NAMES

# One colour per arm in every panel.
_COLOUR = dict(zip(ARM_NAMES, ["black", "tab:red", "tab:blue", "tab:green", "tab:purple"],
                   strict=True))
SMOOTHING = 0.9
"""Exponential smoothing of the training-loss curves."""


def _smoothed(values: list[float]) -> list[float]:
    out, level = [], None
    for v in values:
        level = v if level is None else SMOOTHING * level + (1 - SMOOTHING) * v
        out.append(level)
    return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
    length = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(length)]


def _arms(doc: dict) -> list[str]:
    return list(dict.fromkeys(r["arm"] for r in doc["runs"]))


def _training_panel(axes, doc: dict) -> None:
    pretrain = _mean_curve([p["train_curve"] for p in doc["pretrain"]])
    offset = len(pretrain)
    if pretrain:
        axes.plot(range(1, offset + 1), _smoothed(pretrain), color="tab:gray",
                  label="dense pretraining")
    for arm in _arms(doc):
        curve = _mean_curve([r["train_curve"] for r in doc["runs"] if r["arm"] == arm])
        axes.plot(range(offset + 1, offset + len(curve) + 1), _smoothed(curve),
                  color=_COLOUR.get(arm, "tab:orange"), label=arm, linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("training step")
    axes.set_ylabel(f"training loss (mean over seeds, smoothed {SMOOTHING})")
    axes.set_title("training")


def _heldout_panel(axes, doc: dict) -> None:
    for arm in _arms(doc):
        runs = [r for r in doc["runs"] if r["arm"] == arm]
        steps = [s for s, _ in runs[0]["heldout_curve"]]
        losses = _mean_curve([[loss for _, loss in r["heldout_curve"]] for r in runs])
        axes.plot(steps[:len(losses)], losses, marker="o", markersize=3,
                  color=_COLOUR.get(arm, "tab:orange"), label=arm)
    axes.set_xlabel("fine-tuning step")
    axes.set_ylabel("held-out loss (mean over seeds)")
    axes.set_title("held-out loss during fine-tuning")


def _relative_panel(axes, doc: dict) -> None:
    rows = doc["summary"]
    means = [100 * r["heldout_loss_vs_dense_mean"] for r in rows]
    spreads = [100 * (r["heldout_loss_vs_dense_sd"] or 0.0) for r in rows]
    axes.bar(range(len(rows)), means, yerr=spreads, capsize=4,
             color=[_COLOUR.get(r["arm"], "tab:orange") for r in rows])
    for i, r in enumerate(rows):
        axes.scatter([i] * len(r["seeds"]),
                     [100 * x["heldout_loss_vs_dense"] for x in doc["runs"]
                      if x["arm"] == r["arm"]], color="white", edgecolor="black", zorder=3,
                     s=14)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=20)
    axes.set_ylabel("held-out loss vs dense, % (bars: mean ± sd; dots: seeds)")
    axes.set_title("after fine-tuning")


def write_plot(doc: dict, path: str | os.PathLike) -> None:
    """Write the three-panel PNG of `doc` to `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 3, figsize=(17, 5))
    _training_panel(panels[0], doc)
    _heldout_panel(panels[1], doc)
    _relative_panel(panels[2], doc)
    for axes in panels[:2]:
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    panels[2].grid(True, axis="y", alpha=0.3)
    env, settings = doc["environment"], doc["settings"]
    sparsity = settings.get("sparsity")
    figure.suptitle(
        f"sla-tl quality: {settings['task']}"
        + (f", sparsity {sparsity:.0%}" if sparsity is not None else "")
        + f", seeds {', '.join(str(s) for s in settings['seeds'])}, on {env['gpu'] or 'CPU'} "
        f"(commit {(env['git_commit'] or '?')[:10]}, {env['date_utc'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
