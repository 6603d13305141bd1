"""Where Optuna keeps studies: an SQLite file under the cache directory by default, or any
SQLAlchemy URL (PostgreSQL, MySQL, ...) so that several processes, GPUs or hosts can work
on one study together."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import sqlalchemy

from sla_tl.config_store import cache_dir

DEFAULT_FILE = "optuna.db"
# Seconds an SQLite writer waits for another's lock before failing.
SQLITE_BUSY_TIMEOUT_S = 120
CREATE_ATTEMPTS = 4


def default_url() -> str:
    """`sqlite:///$SLA_TL_CACHE_DIR/optuna.db`."""
    return f"sqlite:///{cache_dir() / DEFAULT_FILE}"


def open_storage(url: str | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url` (default: `default_url()`), creating an SQLite file's
    directory."""
    url = url or default_url()
    engine_kwargs: dict = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Concurrent writers queue on SQLite's lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    for attempt in range(1, CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except sqlalchemy.exc.SQLAlchemyError:
            # Workers opening a new database together race to create its tables; the
            # loser finds them made on the next attempt.
            time.sleep(0.5 * attempt)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
