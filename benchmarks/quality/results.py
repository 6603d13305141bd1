"""The JSON file `sla-tl quality` writes: its schema, validation, merging and the summary.

    {"schema_version": 1, "kind": "sla-tl quality",
     "environment": {gpu, driver, torch, tilelang, git_commit, date_utc, ...}  (as the bench's)
     "settings": {task, size, device, protocol: {...}, sparsity, arms: [...], seeds, command},
     "pretrain": [{seed, heldout_loss, step_ms, train_curve}],
     "runs": [{seed, arm, heldout_loss, heldout_loss_vs_dense, heldout_curve, train_curve,
               attention_error, attention_error_start, attention_error_layers, kept_mass,
               kept_mass_start, step_ms, trained_parameters, attention_parameters}],
     "summary": [{arm, seeds, <figure>_mean, <figure>_sd for each SUMMARISED figure}]}
"""

from __future__ import annotations

import json
import math
import os
import statistics

from ..result_file import ENVIRONMENT_FIELDS, field_problems

SCHEMA_VERSION = 1
KIND = "sla-tl quality"
SUMMARISED = ("heldout_loss", "heldout_loss_vs_dense", "attention_error",
              "attention_error_start", "kept_mass", "kept_mass_start", "step_ms")

# The bench's environment block; a quality run may also run on a CPU.
ENVIRONMENT = {**ENVIRONMENT_FIELDS, "gpu": (str, type(None))}
_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
RUN_FIELDS: dict[str, tuple] = {
    "seed": (int,), "arm": (str,), "heldout_loss": _NUMBER, "heldout_loss_vs_dense": _NUMBER,
    "heldout_curve": (list,), "train_curve": (list,), "attention_error": _OPTIONAL_NUMBER,
    "attention_error_start": _OPTIONAL_NUMBER, "attention_error_layers": (list,),
    "kept_mass": _OPTIONAL_NUMBER, "kept_mass_start": _OPTIONAL_NUMBER,
    "step_ms": _NUMBER, "trained_parameters": (int,), "attention_parameters": (int,),
}
PRETRAIN_FIELDS: dict[str, tuple] = {
    "seed": (int,), "heldout_loss": _NUMBER, "step_ms": _OPTIONAL_NUMBER, "train_curve": (list,),
}
SETTINGS_FIELDS: dict[str, tuple] = {
    "task": (str,), "device": (str,), "protocol": (dict,), "arms": (list,), "seeds": (list,),
}


def validate(doc: object) -> list[str]:
    """What is wrong with `doc` as a quality result (empty when nothing is)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("kind") != KIND or doc.get("schema_version") != SCHEMA_VERSION:
        return [f"kind {doc.get('kind')!r} version {doc.get('schema_version')!r}, expected "
                f"{KIND!r} version {SCHEMA_VERSION}"]
    problems = field_problems("environment", doc.get("environment"), ENVIRONMENT)
    problems += field_problems("settings", doc.get("settings"), SETTINGS_FIELDS)
    for name, fields in (("pretrain", PRETRAIN_FIELDS), ("runs", RUN_FIELDS)):
        records = doc.get(name)
        if not isinstance(records, list):
            problems.append(f"{name!r} is missing or not a list")
            continue
        for i, record in enumerate(records):
            problems += field_problems(f"{name} {i}", record, fields)
    return problems


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict], arm_order: list[str]) -> list[dict]:
    """Per arm, in `arm_order`: the seeds, and mean and sample standard deviation over seeds
    of each SUMMARISED figure (sd None for a single seed)."""
    summary = []
    for arm in arm_order:
        of_arm = [r for r in runs if r["arm"] == arm]
        if not of_arm:
            continue
        row = dict(arm=arm, seeds=sorted(r["seed"] for r in of_arm))
        for figure in SUMMARISED:
            values = [r[figure] for r in of_arm if r[figure] is not None]
            row[f"{figure}_mean"], row[f"{figure}_sd"] = _mean_sd(values)
        summary.append(row)
    return summary


def make_result(environment: dict, settings: dict, pretrain: list[dict],
                runs: list[dict]) -> dict:
    """A result document, with its summary."""
    arms = [a["name"] for a in settings["arms"]]
    return dict(schema_version=SCHEMA_VERSION, kind=KIND, environment=environment,
                settings=settings, pretrain=pretrain, runs=runs, summary=summarise(runs, arms))


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def save(doc: dict, path: str | os.PathLike) -> None:
    """Write a result (validated first: a broken or non-finite one is never written)."""
    problems = validate(doc)
    if not _finite(doc):
        problems.append("a figure is not finite")
    if problems:
        raise ValueError("refusing to write an invalid quality result:\n  "
                         + "\n  ".join(problems[:20]))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def load(path: str | os.PathLike) -> dict:
    """Read and validate a result; ValueError naming the file and what is wrong with it."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    problems = validate(doc)
    if problems:
        raise ValueError(f"{path} is not a quality result:\n  " + "\n  ".join(problems[:20]))
    return doc


# Settings that must agree for results to be merged (seeds and the command may differ).
_SAME_SETTINGS = ("task", "size", "device", "protocol", "arms", "sparsity")


def merge(docs: list[dict]) -> dict:
    """One result from several runs of the same settings and commit (e.g. one seed each);
    a seed present in two of them is an error."""
    first = docs[0]
    for doc in docs[1:]:
        for name in _SAME_SETTINGS:
            if doc["settings"].get(name) != first["settings"].get(name):
                raise ValueError(f"cannot merge quality results with different {name}")
        if doc["environment"]["git_commit"] != first["environment"]["git_commit"]:
            raise ValueError("cannot merge quality results of different commits: "
                             f"{first['environment']['git_commit']!r} and "
                             f"{doc['environment']['git_commit']!r}")
    seeds = [p["seed"] for doc in docs for p in doc["pretrain"]]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"cannot merge: seeds {repeated} appear in more than one result")
    settings = dict(first["settings"], seeds=sorted(seeds),
                    parts=[doc["environment"]["date_utc"] for doc in docs])
    return make_result(first["environment"], settings,
                       [p for doc in docs for p in doc["pretrain"]],
                       [r for doc in docs for r in doc["runs"]])
