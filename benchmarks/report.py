"""The terminal table of a bench result: one block per shape and mode."""

from __future__ import annotations

from .suite import MODE_NAMES, Shape

_HEAD = (f"{'system':<12} {'sparsity':>8} {'median ms':>10} {'TFLOP/s':>8} {'per block':>10} "
         f"{'vs cuDNN':>9} {'peak MiB':>9} {'mem/cuDNN':>10}")


def _line(row: dict) -> str:
    sparsity = "dense" if row["sparsity"] is None else f"{row['sparsity']:.2f}"
    if "error" in row:
        return f"{row['system']:<12} {sparsity:>8} failed: {row['error'][:100]}"
    speedup = f"{row['speedup_vs_cudnn']:.2f}x" if "speedup_vs_cudnn" in row else "-"
    memory = f"{row['memory_vs_cudnn']:.2f}x" if "memory_vs_cudnn" in row else "-"
    return (f"{row['system']:<12} {sparsity:>8} {row['median_ms']:>10.3f} "
            f"{row['tflops_dense_equiv']:>8.1f} {row['tflops_per_computed_block']:>10.1f} "
            f"{speedup:>9} {row['peak_memory_mb']:>9.0f} {memory:>10}")


def format_table(doc: dict) -> str:
    """The result as fixed-width text: TFLOP/s is dense-equivalent (dense attention's FLOPs
    over the time); "per block" counts only the blocks a sparse system computes."""
    groups: dict[tuple, list[dict]] = {}
    for row in doc["rows"]:
        groups.setdefault((row["shape"], row["batch"], row["heads"], row["length"], row["dim"],
                           row["dtype"], row["mode"]), []).append(row)
    env = doc["environment"]
    lines = [f"{env['gpu']}, torch {env['torch']}, tilelang {env['tilelang']}, "
             f"commit {(env['git_commit'] or 'unknown')[:12]}, {env['date_utc']}, timed "
             + ("as called" if doc["settings"]["timing"] == "call" else "kernels only")]
    for name, reason in doc["skipped_systems"].items():
        lines.append(f"skipped {name}: {reason}")
    for (label, batch, heads, length, dim, dtype, mode), rows in groups.items():
        shape = Shape(label, batch, heads, length, dim, dtype)
        lines += ["", f"{label}: {shape.describe()}, {MODE_NAMES[mode]}", _HEAD,
                  "-" * len(_HEAD)]
        lines += [_line(row) for row in rows]
    return "\n".join(lines)

