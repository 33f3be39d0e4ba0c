"""The registry on PostgreSQL, so several replicas share tenants, versions and active pointers.

`PostgresRegistry` is `SQLiteRegistry` with another storage underneath: every registry
operation (validation, content-addressed store copy, audit row and generation bump in
the same transaction, rollback history, idempotent `add_version`, error codes) is the
inherited code, run against a PostgreSQL connection through a small adapter that speaks
the sqlite3 calls it uses (`execute` with `?` placeholders, `fetchone`, `fetchall`,
iteration, `lastrowid`). What differs is only the plumbing:

- writers serialise on one transaction-level advisory lock, taken first in every write
  transaction; this is SQLite's `BEGIN IMMEDIATE` across replicas, so check-then-write
  sequences (tenant exists? key in use? current version?) stay atomic;
- `lora_int_id` comes from an identity column, whose sequence never hands a value out
  twice (not even after a rollback), so ids are never reused across replicas;
- a lost connection is reopened on the next call; a database that cannot be reached,
  a lock held past `lock_timeout_s`, or any other database error is RegistryError 503
  "registry_unavailable" and changes nothing.

The artifact store stays on the filesystem under `<state_dir>/store`: with several
replicas it must be a shared volume (same path on every replica), because version rows
name absolute store paths.

Replicas learn about each other's changes in two ways. Every change transaction ends
with `NOTIFY unlearnd_registry` (delivered by PostgreSQL when, and only when, it
commits), and `watch()` keeps a second connection `LISTEN`ing on that channel in a
daemon thread, so a swap made through one replica wakes every other within
milliseconds. Polling `generation()` (one indexed read) every
`ServerConfig.registry_poll_s` seconds stays as the fallback: a notification is lost
while the listening connection is down (the watcher then reconnects with backoff and
reports one change on reconnecting, so nothing missed meanwhile stays missed). See
unlearnd/serve/app.py `_poll_registry`. A replica loads the new adapter before it
routes to it, so what a swap costs to reach a replica is the notification, one
snapshot read and that load.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from unlearnd.serve.artifacts import BaseModelSpec
from unlearnd.serve.registry import RegistryError, SQLiteRegistry

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key every write transaction takes: b"unlearnd" as a big-endian
# int64, so it does not collide with other applications' advisory locks on the database.
WRITE_LOCK_KEY = int.from_bytes(b"unlearnd", "big")
# The channel every change transaction notifies (payload: the action) and watchers listen on.
NOTIFY_CHANNEL = "unlearnd_registry"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation BIGINT NOT NULL)""",
    "INSERT INTO state (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    """CREATE TABLE IF NOT EXISTS tenants (
        name TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        cache_salt TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        active_version TEXT)""",
    # INTEGER: vLLM's LoRARequest.lora_int_id is a positive int32-sized int.
    """CREATE TABLE IF NOT EXISTS versions (
        lora_int_id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        adapter_dir TEXT,
        policy_dir TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        meta TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS versions_tenant ON versions (tenant)",
    """CREATE TABLE IF NOT EXISTS history (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant TEXT NOT NULL,
        version TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS history_tenant ON history (tenant, id)",
    """CREATE TABLE IF NOT EXISTS audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        tenant TEXT,
        detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, id)",
)

# Tables whose key the database assigns: an INSERT into one returns the key, which the
# adapter exposes as sqlite3's `cursor.lastrowid`.
_GENERATED_KEYS = {"versions": "lora_int_id", "history": "id", "audit": "id"}
_INSERT_INTO = re.compile(r"\s*INSERT\s+INTO\s+(\w+)", re.IGNORECASE)
# sqlite statement text -> (PostgreSQL text, returns a generated key); the registry's
# statements are a fixed set, so this stays small.
_TRANSLATIONS: dict[str, tuple[str, bool]] = {}


def redact_url(url: str) -> str:
    """`url` with the password replaced by `***`, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


class _Cursor:
    """The part of sqlite3.Cursor the inherited registry code uses."""

    def __init__(self, cursor: Any, lastrowid: int | None, rows: list | None) -> None:
        self._cursor = cursor
        self.lastrowid = lastrowid
        self._rows = rows  # already fetched (INSERT ... RETURNING)

    def fetchone(self) -> tuple | None:
        if self._rows is not None:
            return self._rows.pop(0) if self._rows else None
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple]:
        if self._rows is not None:
            rows, self._rows = self._rows, []
            return rows
        return self._cursor.fetchall()

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.fetchall())


class _SqliteDialect:
    """A psycopg connection that answers the sqlite3 calls of SQLiteRegistry.

    Rewrites `?` placeholders to `%s` (the registry's SQL has no other `?` or `%`) and
    appends `RETURNING <key>` to INSERTs into tables with a generated key so that
    `lastrowid` works. Translations are cached per statement text.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @staticmethod
    def _translate(sql: str) -> tuple[str, bool]:
        hit = _TRANSLATIONS.get(sql)
        if hit is None:
            if "%" in sql:
                raise ValueError(f"statement has a literal %: {sql!r}")
            pg = sql.replace("?", "%s")
            m = _INSERT_INTO.match(sql)
            returning = bool(m and m.group(1).lower() in _GENERATED_KEYS)
            if returning:
                pg += f" RETURNING {_GENERATED_KEYS[m.group(1).lower()]}"
            hit = _TRANSLATIONS[sql] = (pg, returning)
        return hit

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        pg, returning = self._translate(sql)
        cur = self._conn.execute(pg, tuple(params))
        if returning:
            rows = cur.fetchall()
            return _Cursor(cur, rows[0][0], [])
        return _Cursor(cur, None, None)


class PostgresRegistry(SQLiteRegistry):
    """Registry kept in a PostgreSQL database, artifacts under `<state_dir>/store`.

    `database_url`: `postgresql://user:password@host:port/db` (libpq URL; parameters
    such as `sslmode` pass through). `base` and `max_lora_rank`: what adapters are
    validated against. `lock_timeout_s`: how long a write waits for another replica's
    write (or any database lock) before giving up with 503; `connect_timeout_s`: how
    long opening a connection may take; `statement_timeout_s`: the longest any one
    statement may run. Thread-safe: one connection guarded by a lock, reopened after
    it breaks. The tables are created when missing, under the write lock, so replicas
    starting together do not race.
    """

    def __init__(
        self,
        database_url: str,
        state_dir: Path,
        *,
        base: BaseModelSpec,
        max_lora_rank: int,
        lock_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 30.0,
    ) -> None:
        if not isinstance(database_url, str) or not database_url.startswith(
            ("postgresql://", "postgres://")
        ):
            shown = redact_url(database_url) if isinstance(database_url, str) else database_url
            raise ValueError(f"database_url must be a postgresql:// URL, got {shown!r}")
        for label, value in (
            ("lock_timeout_s", lock_timeout_s),
            ("connect_timeout_s", connect_timeout_s),
            ("statement_timeout_s", statement_timeout_s),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError(
                'database_url needs the psycopg driver: pip install "psycopg[binary]"'
            ) from exc
        self._psycopg = psycopg
        self.database_url = database_url
        self.lock_timeout_s = float(lock_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.statement_timeout_s = float(statement_timeout_s)
        self._init_store(state_dir, base, max_lora_rank)
        self._lock = threading.RLock()
        self._conn: Any = None
        self._closed = False
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
        self._clean_temp_dirs()
        logger.info("registry on %s, store %s", redact_url(database_url), self.store_dir)

    # -- plumbing -----------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection; later calls answer 503."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def _unavailable(self, exc: BaseException) -> RegistryError:
        # psycopg messages name host and port, never the password.
        return RegistryError(503, "registry_unavailable", f"registry is unavailable: {exc}")

    def _connect(self, **extra: Any) -> Any:
        """A new autocommit connection with the registry's timeouts (psycopg.Error on failure)."""
        options = (
            f"-c lock_timeout={int(self.lock_timeout_s * 1000)} "
            f"-c statement_timeout={int(self.statement_timeout_s * 1000)}"
        )
        return self._psycopg.connect(
            self.database_url,
            autocommit=True,  # reads: one statement each; writes: explicit transactions
            connect_timeout=max(1, round(self.connect_timeout_s)),
            options=options,
            **extra,
        )

    def _connection(self) -> Any:
        """The open connection, (re)connecting when there is none or it broke."""
        if self._closed:
            raise RegistryError(503, "registry_unavailable", "registry is closed")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            logger.warning("registry connection to %s lost; reconnecting",
                           redact_url(self.database_url))
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None
        try:
            self._conn = self._connect(application_name="unlearnd")
        except self._psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[_SqliteDialect]:  # type: ignore[override]
        """One write transaction holding the registry's advisory lock: commit on success,
        roll back on any error. Database errors become RegistryError 503 (409 for an
        integrity violation, which the lock should make impossible)."""
        psycopg = self._psycopg
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                    yield _SqliteDialect(conn)
            except psycopg.errors.IntegrityError as exc:
                raise RegistryError(409, "conflict", f"registry conflict: {exc}") from exc
            except psycopg.Error as exc:
                raise self._unavailable(exc) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[_SqliteDialect]:  # type: ignore[override]
        with self._lock:
            conn = self._connection()
            try:
                yield _SqliteDialect(conn)
            except self._psycopg.Error as exc:
                raise self._unavailable(exc) from exc

    @contextlib.contextmanager
    def _snapshot_read(self) -> Iterator[_SqliteDialect]:  # type: ignore[override]
        """Several reads that see one committed state (REPEATABLE READ, read only)."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield _SqliteDialect(conn)
            except self._psycopg.Error as exc:
                raise self._unavailable(exc) from exc

    def _changed(self, conn: Any, actor: str, action: str, tenant: str | None,
                 detail: dict[str, Any]) -> None:
        """The inherited audit row and generation bump, plus a notification that
        PostgreSQL delivers to every listener when this transaction commits."""
        super()._changed(conn, actor, action, tenant, detail)
        conn.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, action))

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """LISTEN on the registry's channel in a daemon thread; `on_change()` runs in
        that thread on every notification, and once after each (re)connect. Returns
        the function that stops the thread (it exits within about a second)."""
        stop = threading.Event()
        thread = threading.Thread(target=self._listen, args=(on_change, stop),
                                  name="unlearnd-registry-listen", daemon=True)
        thread.start()

        def stop_watching() -> None:
            stop.set()
            thread.join(timeout=5)

        return stop_watching

    def _listen(self, on_change: Callable[[], None], stop: threading.Event) -> None:
        psycopg = self._psycopg
        backoff = 0.1
        while not stop.is_set() and not self._closed:
            try:
                conn = self._connect(application_name="unlearnd-listen")
            except psycopg.Error as exc:
                logger.warning("registry listener cannot connect to %s (%s); polling "
                               "only, retrying in %.1f s", redact_url(self.database_url),
                               exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = 0.1
                    on_change()  # whatever changed while no one was listening
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            on_change()
            except psycopg.Error as exc:
                if stop.is_set():
                    break
                logger.warning("registry listener lost its connection (%s); reconnecting",
                               exc)
                time.sleep(0.1)
            except Exception:  # noqa: BLE001 - a failing callback must not end the watch
                logger.exception("registry change callback failed")
                stop.wait(1.0)
