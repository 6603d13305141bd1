"""Where Optuna keeps studies: an SQLite file under the cache directory by default, or any
SQLAlchemy URL (PostgreSQL, MySQL, ...) so that several processes, GPUs or hosts can work
on one study together.

Trials send a heartbeat: a trial whose process was killed stops beating, and the next
worker to open the study fails it and queues it again (Optuna's stale-trial callback), so
no trial stays RUNNING for ever and a killed one is retried.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from sla_tl.paths import cache_dir

DEFAULT_FILE = "optuna.db"
# Seconds an SQLite writer waits for another's lock before failing.
SQLITE_BUSY_TIMEOUT_S = 120
CREATE_ATTEMPTS = 4
# A running trial records a heartbeat this often; one silent for GRACE_S is taken as dead.
HEARTBEAT_S = 30
GRACE_S = 120
# A trial that kills its worker every time is not retried for ever.
STALE_RETRIES = 2


def default_url() -> str:
    """`sqlite:///$SLA_TL_CACHE_DIR/optuna.db`, with the path quoted for SQLAlchemy."""
    database = str(cache_dir() / DEFAULT_FILE)
    return URL.create("sqlite", database=database).render_as_string(hide_password=False)


def _sqlite_file(url: sqlalchemy.engine.URL) -> Path | None:
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def open_storage(url: str | None = None, heartbeat_s: int = HEARTBEAT_S,
                 grace_s: int = GRACE_S) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url` (default: `default_url()`), creating an SQLite file's
    directory, with trial heartbeats. ValueError naming the storage if it cannot be opened."""
    url = url or default_url()
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"storage must be an SQLAlchemy database URL such as "
                         f"sqlite:///path/optuna.db; got {url!r}") from None
    engine_kwargs: dict = {}
    path = _sqlite_file(parsed)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the directory of the Optuna storage {path}: "
                             f"{error.strerror or error}") from None
        # Concurrent writers queue on SQLite's lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    with warnings.catch_warnings():
        # The heartbeat is marked experimental; it has been in Optuna since 2.8.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        options = dict(
            engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=STALE_RETRIES),
        )
        for attempt in range(1, CREATE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(url, **options)
            except sqlalchemy.exc.SQLAlchemyError:
                # Workers opening a new database together race to create its tables; the
                # loser finds them made on the next attempt.
                time.sleep(0.5 * attempt)
        try:
            return optuna.storages.RDBStorage(url, **options)
        except sqlalchemy.exc.SQLAlchemyError as error:
            where = path or parsed.render_as_string(hide_password=True)
            reason = getattr(error, "orig", None) or error
            raise ValueError(f"cannot open the Optuna storage {where}: {reason}") from None
