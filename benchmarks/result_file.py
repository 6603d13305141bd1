"""The JSON file `sla-tl bench` writes (and the gate reads as a baseline): its schema,
validation, merging and naming.

    {"schema_version": 1,
     "environment": {"gpu", "driver", "torch", "tilelang", "git_commit", "date_utc", ...},
     "settings": {"timing": "call" or "kernels", ...how it was run...},
     "skipped_systems": {system: reason},
     "rows": [{shape, batch, heads, length, dim, dtype, block_q, block_kv, sparsity, topk,
               density, system, mode, and either the figures (median_ms, repeats,
               tflops_dense_equiv, tflops_per_computed_block, peak_memory_mb and, where
               cuDNN ran, speedup_vs_cudnn, memory_vs_cudnn) or error}]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sla_tl.targets import model_slug
from sla_tl.timing import TIMINGS
from sla_tl.validation import is_finite

from .suite import MODE_NAMES, MODES, Shape

SCHEMA_VERSION = 1

_NUMBER = (int, float)
ENVIRONMENT_FIELDS: dict[str, tuple] = {
    "gpu": (str,), "driver": (str, type(None)), "torch": (str,), "tilelang": (str, type(None)),
    "git_commit": (str, type(None)), "date_utc": (str,),
}
ROW_FIELDS: dict[str, tuple] = {
    "shape": (str,), "batch": (int,), "heads": (int,), "length": (int,), "dim": (int,),
    "dtype": (str,), "block_q": (int,), "block_kv": (int,),
    "sparsity": (*_NUMBER, type(None)), "topk": (*_NUMBER, type(None)), "density": _NUMBER,
    "system": (str,), "mode": (str,),
}
FIGURE_FIELDS: dict[str, tuple] = {
    "median_ms": _NUMBER, "repeats": (int,), "tflops_dense_equiv": _NUMBER,
    "tflops_per_computed_block": _NUMBER, "peak_memory_mb": _NUMBER,
}
OPTIONAL_FIGURE_FIELDS: dict[str, tuple] = {"speedup_vs_cudnn": _NUMBER,
                                            "memory_vs_cudnn": _NUMBER}


def make_result(environment: dict, settings: dict, skipped: dict[str, str],
                rows: list[dict]) -> dict:
    """A result document."""
    return dict(schema_version=SCHEMA_VERSION, environment=environment, settings=settings,
                skipped_systems=skipped, rows=rows)


def field_problems(where: str, record: object, fields: dict[str, tuple]) -> list[str]:
    """What is wrong with `record` (named `where`) as an object holding `fields`, each of
    one of its types (a bool is never an int here)."""
    if not isinstance(record, dict):
        return [f"{where}: not an object"]
    problems = []
    for name, types in fields.items():
        if name not in record:
            problems.append(f"{where}: missing {name!r}")
        # bool is an int to Python, never a valid figure or size here.
        elif isinstance(record[name], bool) or not isinstance(record[name], types):
            problems.append(f"{where}: {name!r} is {type(record[name]).__name__}")
    return problems


def validate(doc: object) -> list[str]:
    """What is wrong with `doc` as a result document (empty when nothing is)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version is {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}"]
    problems = []
    for name, kind in (("environment", dict), ("settings", dict), ("skipped_systems", dict),
                       ("rows", list)):
        if not isinstance(doc.get(name), kind):
            problems.append(f"{name!r} is missing or not a {kind.__name__}")
    if problems:
        return problems
    problems += field_problems("environment", doc["environment"], ENVIRONMENT_FIELDS)
    if doc["settings"].get("timing") not in TIMINGS:
        problems.append(f"settings: timing {doc['settings'].get('timing')!r} is not one of "
                        f"{TIMINGS}")
    for i, row in enumerate(doc["rows"]):
        where = f"row {i}"
        if not isinstance(row, dict):
            problems.append(f"{where}: not an object")
            continue
        problems += field_problems(where, row, ROW_FIELDS)
        if row.get("mode") not in MODES:
            problems.append(f"{where}: mode {row.get('mode')!r} is not one of {MODES}")
        if "error" in row:
            if not isinstance(row["error"], str):
                problems.append(f"{where}: 'error' is not a string")
            continue
        problems += field_problems(where, row, FIGURE_FIELDS)
        present = {k: v for k, v in OPTIONAL_FIGURE_FIELDS.items() if k in row}
        problems += field_problems(where, row, present)
        problems += _figure_problems(where, row, [*FIGURE_FIELDS, *present])
    return problems


def _figure_problems(where: str, row: dict, names: list[str]) -> list[str]:
    """Every figure is a finite positive number: a NaN, infinite or zero speedup would pass
    (or break) the gate's comparisons."""
    problems = []
    for name in names:
        value = row.get(name)
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            continue  # reported as a type problem
        if not is_finite(value):
            problems.append(f"{where}: {name} {value} is not finite")
        elif not value > 0:
            problems.append(f"{where}: {name} {value} is not positive")
    return problems


def load(path: str | os.PathLike) -> dict:
    """Read and validate a result document; a one-line ValueError naming the file and what
    is wrong with it (unreadable, not JSON, or its first problems)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not JSON: {error}") from None
    problems = validate(doc)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{path} is not a bench result: " + "; ".join(problems[:3]) + more)
    return doc


def save(doc: dict, path: str | os.PathLike) -> None:
    """Write a result document (validated first, so a broken one is never written)."""
    problems = validate(doc)
    if problems:
        raise ValueError("refusing to write an invalid result:\n  " + "\n  ".join(problems))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def row_key(row: dict) -> tuple:
    """What a row measured: system, mode, shape, dtype, blocks and sparsity."""
    return (row["system"], row["mode"], row["batch"], row["heads"], row["length"], row["dim"],
            row["dtype"], row["block_q"], row["block_kv"], row["sparsity"])


def describe_row(row: dict) -> str:
    """"sla_tl forward+backward on wan2.1-1.3b-480p (B=1 H=12 L=32760 D=128 bf16,
    sparsity 0.95)": the kernel and the shape, for the gate's messages."""
    shape = Shape(row["shape"], row["batch"], row["heads"], row["length"], row["dim"],
                  row["dtype"])
    sparsity = "" if row["sparsity"] is None else f", sparsity {row['sparsity']:.2f}"
    return (f"{row['system']} {MODE_NAMES[row['mode']]} on {row['shape']} "
            f"({shape.describe()}{sparsity}, blocks {row['block_q']}x{row['block_kv']})")


def merge(docs: list[dict]) -> dict:
    """One document from results of the same GPU model and commit (a suite run in parts).
    Each row keeps the speedup of its own run; a case measured twice keeps its first row."""
    first = docs[0]["environment"]
    for doc in docs[1:]:
        env = doc["environment"]
        for field in ("gpu", "git_commit"):
            if env[field] != first[field]:
                raise ValueError(f"cannot merge results of different {field}: "
                                 f"{first[field]!r} and {env[field]!r}")
        timing, first_timing = doc["settings"]["timing"], docs[0]["settings"]["timing"]
        if timing != first_timing:
            raise ValueError(f"cannot merge results timed different ways: {first_timing!r} and "
                             f"{timing!r} (measure every part with the same --timing)")
    rows: dict[tuple, dict] = {}
    for doc in docs:
        for row in doc["rows"]:
            rows.setdefault(row_key(row), row)
    skipped = {k: v for doc in docs for k, v in doc["skipped_systems"].items()}
    settings = dict(docs[0]["settings"], parts=[doc["environment"]["date_utc"] for doc in docs])
    return make_result(docs[0]["environment"], settings, skipped, list(rows.values()))


def baseline_path(directory: str | os.PathLike, gpu: str) -> Path:
    """The baseline file of a GPU model in `directory`: e.g. NVIDIA-H200.json."""
    return Path(directory) / f"{model_slug(gpu)}.json"
