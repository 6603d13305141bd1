"""Tuned schedules, stored as JSON under the cache directory and read by the CUDA operators.

The autotuner writes one entry per tuned problem (`TuneKey`). An operator call looks its
problem up in memory: the file is read once per process (again after `reload()`), and
each distinct call shape is resolved once, so the hot path does no file or database access.

Lookup order, for a call on a given GPU model, arch and TileLang version:
1. "tuned": an entry for exactly this problem (shape, dtype, block sizes, feature map,
   linear mode, layout, and the same critical and negligible block counts);
2. "nearest": the entry with the same dim, dtype, block sizes, feature map, linear mode and
   layout whose size (B*H*Lq, Lk) and density are closest on a log scale;
3. "default": no entry; every kernel takes its per-arch default knobs.
Entries made on another GPU model, arch or TileLang version are never used.

The operators never fail because of this file. One that cannot be read or parsed, an
entry with a missing, extra or out-of-range field, or a knob value outside the schedule's
search space is reported in one warning (`TunedConfigWarning`) naming the file, and
skipped: the call gets the entries that can be used, else the defaults. Writing moves a
damaged file aside first and says where; a file of a newer format is read as far as this
version understands it and never rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import math
import os
import secrets
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from . import spec
from .paths import cache_dir
from .validation import KERNEL_DTYPE_NAMES, check_choice, check_ratio, is_finite_positive

STORE_FILE = "tuned_configs.json"
FORMAT_VERSION = 1


class TuneKey(NamedTuple):
    """One tuned problem: where it was tuned, its shape, and its algorithm knobs."""

    gpu: str
    arch: str
    tilelang: str
    batch: int
    heads: int
    lq: int
    lk: int
    dim: int
    dtype: str
    block_q: int
    block_kv: int
    topk: float
    k_low: float
    feature_map: str
    linear: str
    layout: str

    def study_name(self) -> str:
        """A readable, unique name for this key's Optuna study."""
        return "|".join(f"{name}={value}" for name, value in self._asdict().items())

    def block_counts(self) -> tuple[int, int]:
        """(critical, negligible) key blocks per query row for this key."""
        n_kv = spec.num_blocks(self.lk, self.block_kv)
        n_crit = spec.num_critical(self.topk, n_kv)
        return n_crit, spec.num_negligible(self.k_low, n_kv, n_crit)

    def call_key(self) -> CallKey:
        """What a call of this problem looks up."""
        n_crit, n_neg = self.block_counts()
        shared = {name: getattr(self, name) for name in CallKey._fields if name in self._fields}
        return CallKey(**shared, n_crit=n_crit, n_neg=n_neg)


class CallKey(NamedTuple):
    """What an operator call knows about its problem (block counts, not ratios)."""

    gpu: str
    arch: str
    tilelang: str
    batch: int
    heads: int
    lq: int
    lk: int
    dim: int
    dtype: str
    block_q: int
    block_kv: int
    n_crit: int
    n_neg: int
    feature_map: str
    linear: str
    layout: str


class Entry(NamedTuple):
    """A stored result of tuning one key."""

    key: TuneKey
    schedule: dict
    latency_ms: float
    default_latency_ms: float | None
    trials: int


class Lookup(NamedTuple):
    """The schedule a call uses, where it came from, and the entry it came from (if any)."""

    schedule: dict
    source: str
    entry: Entry | None


_FAMILY = ("gpu", "arch", "tilelang", "dim", "dtype", "block_q", "block_kv", "feature_map",
           "linear", "layout")


def _family(key: TuneKey | CallKey) -> tuple:
    return tuple(getattr(key, name) for name in _FAMILY)


def _distance(entry: TuneKey, call: CallKey) -> float:
    n_crit, _ = entry.block_counts()
    n_kv_entry = spec.num_blocks(entry.lk, entry.block_kv)
    n_kv_call = spec.num_blocks(call.lk, call.block_kv)
    rows_entry = entry.batch * entry.heads * entry.lq
    rows_call = call.batch * call.heads * call.lq
    # A precomputed LUT may be empty: count it as one block for the comparison.
    density_call = max(call.n_crit, 1) / n_kv_call
    return (abs(math.log(rows_entry / rows_call)) + abs(math.log(entry.lk / call.lk))
            + abs(math.log((n_crit / n_kv_entry) / density_call)))


def _exact(entry: TuneKey, call: CallKey) -> bool:
    same = ("batch", "heads", "lq", "lk")
    return (_family(entry) == _family(call)
            and all(getattr(entry, n) == getattr(call, n) for n in same)
            and entry.block_counts() == (call.n_crit, call.n_neg))


class StoreError(ValueError):
    """The store cannot be written: a newer format, or a path that cannot be written."""


class TunedConfigWarning(UserWarning):
    """A problem with the store that the operators work around (they use the defaults)."""


class _Contents(NamedTuple):
    """What reading the store found."""

    entries: list[Entry]
    problems: list[str]
    """Why parts of the file were not used (empty: all of it was)."""
    damaged: bool
    """The file holds something this version cannot use and would lose by rewriting it."""
    newer_format: int | None
    """The file's format number when it is newer than this version's."""


class ConfigStore:
    """The tuned-schedule file of one cache directory, held in memory.

    Reading never fails: a file that cannot be read, is damaged or holds malformed entries
    gives a warning naming the file and what is wrong, and every entry that can be used.
    Writing moves a damaged file aside first (and says where), so nothing is lost.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: list[Entry] | None = None
        self._resolved: dict[CallKey, Lookup] = {}
        self._lock = threading.Lock()
        self.generation = 0
        """Counts the times the store was read again (`reload`): what was resolved from an
        earlier reading is stale."""

    def entries(self) -> list[Entry]:
        """Every usable stored entry (read from disk on first use)."""
        if self._entries is None:
            contents = _read(self.path)
            if contents.problems:
                # Once per read (the file is read once per process), not once per call.
                warnings.warn(f"{self.path}: " + "; ".join(contents.problems[:5])
                              + _using(contents), TunedConfigWarning, stacklevel=2)
            self._entries = contents.entries
        return self._entries

    def lookup(self, call: CallKey) -> Lookup:
        """The schedule for a call (see the module docstring for the order)."""
        found = self._resolved.get(call)
        if found is None:
            with self._lock:
                found = self._resolve(call)
                self._resolved[call] = found
        return found

    def _resolve(self, call: CallKey) -> Lookup:
        family = [e for e in self.entries() if _family(e.key) == _family(call)]
        for entry in family:
            if _exact(entry.key, call):
                return Lookup(entry.schedule, "tuned", entry)
        if family:
            entry = min(family, key=lambda e: _distance(e.key, call))
            return Lookup(entry.schedule, "nearest", entry)
        return Lookup({}, "default", None)

    def record(self, entry: Entry) -> None:
        """Add or replace the entry for `entry.key`; safe against concurrent writers.
        StoreError if the file is of a newer format or cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_suffix(".lock")):
                contents = _read(self.path)
                if contents.newer_format is not None:
                    raise StoreError(
                        f"{self.path} was written by a newer sla-tl (format "
                        f"{contents.newer_format}; this one writes {FORMAT_VERSION}) and "
                        "rewriting it would drop what this version does not know: tune with "
                        "the newer version, or move the file aside")
                if contents.damaged:
                    aside = _move_aside(self.path)
                    warnings.warn(f"{self.path}: " + "; ".join(contents.problems[:5])
                                  + f"; moved it to {aside} and wrote a new store",
                                  TunedConfigWarning, stacklevel=2)
                kept = [e for e in contents.entries if e.key != entry.key]
                _write(self.path, [*kept, entry])
        except OSError as error:
            where = f" ({error.filename})" if error.filename else ""
            raise StoreError(f"cannot write the tuned-config store {self.path}: "
                             f"{error.strerror or error}{where}") from None
        self.reload()

    def reload(self) -> None:
        """Forget what was read, so the next lookup reads the file again."""
        with self._lock:
            self._entries = None
            self._resolved = {}
            self.generation += 1


def _using(contents: _Contents) -> str:
    if not contents.entries:
        return "; the operators use the default schedules"
    return (f"; the operators use its {len(contents.entries)} good entries and the defaults "
            "elsewhere")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, never following a symlink there or truncating anything."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symbolic link; refusing to use it as a lock file "
                             "(remove it)") from None
        raise
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _move_aside(path: Path) -> Path:
    """Rename a damaged store to a free name of its own, e.g.
    tuned_configs.json.damaged-20261201T120000."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in itertools.count():
        aside = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside


def _read(path: Path) -> _Contents:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return _Contents([], [], False, None)
    except OSError as error:
        return _Contents([], [f"cannot be read ({error.strerror or error})"], False, None)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        return _Contents([], [f"is not JSON ({error})" if isinstance(error, ValueError)
                              else "is not JSON (nested too deeply)"], True, None)
    shape = _document_problem(data)
    if shape:
        return _Contents([], [shape], True, None)
    newer = data["format"] if data["format"] > FORMAT_VERSION else None
    entries, problems = [], []
    if newer is not None:
        problems.append(f"written by a newer sla-tl (format {newer}; this one reads "
                        f"{FORMAT_VERSION}): only the entries this version understands are used")
    for index, raw in enumerate(data["entries"]):
        entry, problem = _parse_entry(raw, strict=newer is None)
        if problem:
            problems.append(f"entry {index} skipped: {problem}")
        else:
            entries.append(entry)
    return _Contents(entries, problems, bool(problems) and newer is None, newer)


def _document_problem(data: object) -> str | None:
    if not isinstance(data, dict):
        return f"is not a tuned-config store (a JSON {type(data).__name__}, not an object)"
    version = data.get("format")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return f"has no valid format number (format {version!r})"
    if not isinstance(data.get("entries"), list):
        return "has no list of entries"
    return None


def _parse_entry(raw: object, strict: bool) -> tuple[Entry | None, str | None]:
    """An entry from its JSON form, or why it cannot be used. `strict`: the format this
    version writes, where an unknown field is an error (a newer format may add fields)."""
    if not isinstance(raw, dict):
        return None, f"a JSON {type(raw).__name__}, not an object"
    problem = (_fields_problem("", raw, Entry._fields, strict)
               or _fields_problem("key: ", raw["key"] if isinstance(raw.get("key"), dict)
                                  else None, TuneKey._fields, strict))
    if problem:
        return None, problem
    key = {name: raw["key"][name] for name in TuneKey._fields}
    problem = (_key_problem(key) or _schedule_problem(raw["schedule"], key)
               or _figures_problem(raw))
    if problem:
        return None, problem
    return Entry(TuneKey(**key), raw["schedule"], raw["latency_ms"], raw["default_latency_ms"],
                 raw["trials"]), None


def _fields_problem(where: str, record: dict | None, fields: tuple[str, ...],
                    strict: bool) -> str | None:
    if record is None:
        return f"{where}not an object"
    missing = [name for name in fields if name not in record]
    extra = sorted(set(record) - set(fields)) if strict else []
    if missing or extra:
        return f"{where}" + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unknown {', '.join(extra)}"] if extra else []))
    return None


_KEY_TEXT = ("gpu", "arch", "tilelang")
_KEY_SIZES = ("batch", "heads", "lq", "lk")


def _key_problem(key: dict) -> str | None:
    from .targets import arch_named, check_kernel_sizes, model_slug

    for name in _KEY_TEXT:
        if not isinstance(key[name], str) or not key[name]:
            return f"key: {name} is {key[name]!r}, not a name"
    try:
        model_slug(key["gpu"])
    except ValueError as error:
        return f"key: {error}"
    for name in _KEY_SIZES:
        value = key[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"key: {name} is {value!r}, not a positive int"
    checks = (
        lambda: check_choice("dtype", key["dtype"], KERNEL_DTYPE_NAMES),
        lambda: check_choice("feature_map", key["feature_map"], spec.FEATURE_MAPS),
        lambda: check_choice("linear", key["linear"], spec.LINEAR_MODES),
        lambda: check_choice("layout", key["layout"], spec.LAYOUTS),
        lambda: check_ratio("topk", key["topk"]),
        lambda: check_ratio("k_low", key["k_low"]),
        lambda: check_kernel_sizes(arch_named(key["arch"]), key["dim"], key["block_q"],
                                   key["block_kv"]),
    )
    for check in checks:
        try:
            check()
        except (TypeError, ValueError) as error:
            return f"key: {error}"
    return None


def _schedule_problem(schedule: object, key: dict) -> str | None:
    """Every knob must be one the autotuner searches, with one of its values: a value from
    anywhere else may not compile, or give wrong results."""
    from .kernels import search_space, tunable

    if not isinstance(schedule, dict):
        return "schedule is not an object"
    for kernel, knobs in schedule.items():
        if kernel not in tunable(key["arch"]):
            return f"schedule: unknown kernel {kernel!r}"
        if not isinstance(knobs, dict):
            return f"schedule: {kernel} is not an object"
        space = search_space(key["arch"], kernel, key["dim"], key["block_q"], key["block_kv"],
                             key["linear"])
        for name, value in knobs.items():
            if name not in space:
                return f"schedule: {kernel} has no searched knob {name!r}"
            if not any(type(value) is type(c) and value == c for c in space[name]):
                return (f"schedule: {kernel} {name}={value!r} is not one of "
                        f"{list(space[name])}")
    return None


def _figures_problem(raw: dict) -> str | None:
    if not is_finite_positive(raw["latency_ms"]):
        return f"latency_ms is {raw['latency_ms']!r}, not a positive number"
    if raw["default_latency_ms"] is not None and not is_finite_positive(raw["default_latency_ms"]):
        return f"default_latency_ms is {raw['default_latency_ms']!r}, not a positive number"
    trials = raw["trials"]
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        return f"trials is {trials!r}, not a positive int"
    return None


def _write(path: Path, entries: list[Entry]) -> None:
    """Replace `path` atomically, keeping its permission bits (new files get the umask's)."""
    data = {"format": FORMAT_VERSION,
            "entries": [dict(e._asdict(), key=e.key._asdict()) for e in entries]}
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o666)
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


_stores: dict[Path, ConfigStore] = {}
_store_of_setting: dict[tuple[str | None, str | None], ConfigStore] = {}


def active_store() -> ConfigStore:
    """The store of the current cache directory (one object per directory per process)."""
    # Resolved once per value of the variables the directory depends on: the operators ask
    # on every call.
    setting = (os.environ.get("SLA_TL_CACHE_DIR"), os.environ.get("HOME"))
    store = _store_of_setting.get(setting)
    if store is None:
        path = cache_dir() / STORE_FILE
        store = _stores.setdefault(path, ConfigStore(path))
        _store_of_setting[setting] = store
    return store


def schedule_for(call: CallKey) -> dict:
    """The schedule knobs an operator call runs with, by tunable kernel."""
    return active_store().lookup(call).schedule
