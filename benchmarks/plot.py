"""The PNG of a bench result: speedup over dense cuDNN against sparsity, and against length.

Needs matplotlib (`pip install 'sla-tl[bench]'`), imported only here.
"""

from __future__ import annotations

import os
from collections import Counter

from .suite import MODE_NAMES
from .systems import REFERENCE_SYSTEM, SYSTEMS

_LINESTYLE = {"fwd": "-", "fwd+bwd": "--"}


def _color(system: str) -> str:
    """A system's colour; one a result file names but this version does not know is grey."""
    return SYSTEMS[system].color if system in SYSTEMS else "tab:purple"


def require_matplotlib() -> None:
    """Raise a clear ImportError where matplotlib is missing (checked before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("writing the plot needs matplotlib: pip install 'sla-tl[bench]' "
                           "(or leave out --plot)") from None


def _timed(doc: dict) -> list[dict]:
    return [r for r in doc["rows"]
            if "speedup_vs_cudnn" in r and r["system"] != REFERENCE_SYSTEM]


_SHAPE = ("batch", "heads", "length", "dim", "dtype")
_FAMILY = ("batch", "heads", "dim", "dtype")
Series = dict[tuple[str, str], list[tuple[float, float]]]


def _widest(rows: list[dict], fields: tuple[str, ...], varied: str) -> tuple:
    """The value of `fields` under which `varied` takes the most distinct values."""
    spread: dict[tuple, set] = {}
    for r in rows:
        spread.setdefault(tuple(r[f] for f in fields), set()).add(r[varied])
    return max(spread, key=lambda k: len(spread[k]))


def _series(rows: list[dict], x: str) -> Series:
    series: Series = {}
    for r in rows:
        series.setdefault((r["system"], r["mode"]), []).append((r[x], r["speedup_vs_cudnn"]))
    return {k: sorted(v) for k, v in series.items()}


def sparsity_series(doc: dict) -> Series:
    """(system, mode) -> [(sparsity, speedup)] at the shape measured at most sparsities."""
    rows = [r for r in _timed(doc) if r["sparsity"] is not None]
    if not rows:
        return {}
    shape = _widest(rows, _SHAPE, "sparsity")
    return _series([r for r in rows if tuple(r[f] for f in _SHAPE) == shape], "sparsity")


def length_series(doc: dict) -> Series:
    """(system, mode) -> [(length, speedup)] over the batch/heads/D measured at most
    lengths; sparse systems at that family's most measured sparsity."""
    rows = _timed(doc)
    if not rows:
        return {}
    family = _widest(rows, _FAMILY, "length")
    rows = [r for r in rows if tuple(r[f] for f in _FAMILY) == family]
    sparsities = Counter(r["sparsity"] for r in rows if r["sparsity"] is not None)
    sparsity = sparsities.most_common(1)[0][0] if sparsities else None
    return _series([r for r in rows if r["sparsity"] in (None, sparsity)], "length")


def _panel(axes, series: dict, xlabel: str, title: str) -> None:
    for (system, mode), points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, _LINESTYLE[mode], marker="o", color=_color(system),
                  label=f"{system} {MODE_NAMES[mode]}")
    axes.axhline(1.0, color=_color(REFERENCE_SYSTEM), linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("speedup over dense cuDNN (same run)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, "no rows for this panel", ha="center", transform=axes.transAxes)


def write_plot(doc: dict, path: str | os.PathLike) -> None:
    """Write the two-panel PNG of `doc` to `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = doc["environment"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _panel(left, sparsity_series(doc), "sparsity (share of key blocks skipped)",
           "speedup against sparsity")
    _panel(right, length_series(doc), "sequence length (tokens)", "speedup against length")
    figure.suptitle(f"sla-tl bench on {env['gpu']} (commit {(env['git_commit'] or '?')[:10]}, "
                    f"{env['date_utc'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
