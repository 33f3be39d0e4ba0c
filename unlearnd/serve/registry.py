"""Tenants, their policy versions, which one is active, and the audit trail.

`Registry` is the interface the admin API and the request path code against;
`SQLiteRegistry` implements it on the standard library's sqlite3 (WAL mode), so one
server, or several replicas sharing a volume, keep their state in
`<state_dir>/registry.db`. A PostgreSQL implementation can follow the same Protocol.

Policy versions are content-addressed: `<tenant>@<sha256[:12]>` of the adapter and
policy files, copied into `<state_dir>/store/<name>/{adapter,policy}` before the row
is written, so what a version serves cannot change after registration and a name
never names two different contents (vLLM caches LoRA weights and prefix blocks by
name/id: reusing one for new weights would serve stale data).

Every change runs in one transaction together with its audit row and a bump of the
generation counter, which lets pollers notice a change with one cheap read.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from unlearnd.serve.artifacts import (
    BaseModelSpec,
    content_hash,
    validate_adapter,
    validate_policy_dir,
)

logger = logging.getLogger(__name__)

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MIN_API_KEY_CHARS = 16
HASH_PREFIX_CHARS = 12
STORE_DIR = "store"
DB_FILE = "registry.db"


@dataclass(frozen=True)
class Tenant:
    """A customer of the server. `cache_salt` is sent to vLLM with every request of
    the tenant, so no two tenants share prefix-cache blocks; `created_at` is Unix time."""

    name: str
    cache_salt: str
    created_at: float


@dataclass(frozen=True)
class PolicyVersion:
    """One registered, immutable bundle of a LoRA adapter and/or a compiled policy.

    `name` is `<tenant>@<content_hash[:12]>`; `adapter_dir` / `policy_dir` are the
    absolute store paths (None when the version has no such part); `lora_int_id` is
    the positive id vLLM's `LoRARequest` gets, unique over the registry's lifetime
    and never reused; `meta` is free-form JSON the operator attached.
    """

    name: str
    tenant: str
    content_hash: str
    adapter_dir: str | None
    policy_dir: str | None
    lora_int_id: int
    created_at: float
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEntry:
    """One change made to the registry: who (`actor`), what (`action`, e.g.
    "activate"), to which tenant, with action-specific `detail` (never secrets)."""

    id: int
    ts: float
    actor: str
    action: str
    tenant: str | None
    detail: dict


@dataclass(frozen=True)
class RegistrySnapshot:
    """Everything a serving replica mirrors, read in one consistent transaction (see
    `SQLiteRegistry.snapshot`): a fixed number of queries however many tenants exist."""

    generation: int
    tenants: list[Tenant]
    keys: dict[str, str]                          # sha256(key) -> tenant
    active: dict[str, PolicyVersion | None]       # tenant -> active version
    changed_at: dict[str, float | None]           # tenant -> when its pointer last moved


class RegistryError(Exception):
    """A registry request failed. `status`: HTTP status (400/422 invalid input, 404
    not found, 409 conflict with the current state, 503 storage unavailable);
    `code`: short machine-readable reason; `str(e)`: what went wrong."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def __repr__(self) -> str:
        return f"RegistryError({self.status}, {self.code!r}, {str(self)!r})"


class Registry(Protocol):
    """Tenants, policy versions and activation state. Errors are RegistryError, and
    ArtifactError (from unlearnd.serve.artifacts) when `add_version` refuses an artifact."""

    def create_tenant(self, name: str, api_key: str, *, actor: str) -> Tenant:
        """Create a tenant authenticated by `api_key` (>= 16 chars). 409 if it exists."""
        ...

    def rotate_key(self, name: str, api_key: str, *, actor: str) -> None:
        """Replace the tenant's API key; the old one stops working at once."""
        ...

    def tenant_for_key(self, api_key: str) -> Tenant | None:
        """The tenant `api_key` belongs to, None for an unknown key."""
        ...

    def get_tenant(self, name: str) -> Tenant:
        """The tenant called `name`; 404 if none."""
        ...

    def list_tenants(self) -> list[Tenant]:
        """All tenants, by name."""
        ...

    def delete_tenant(self, name: str, *, actor: str) -> None:
        """Remove the tenant, its versions and their stored files."""
        ...

    def add_version(
        self,
        tenant: str,
        *,
        adapter: Path | None,
        policy: Path | None,
        actor: str,
        meta: dict | None = None,
    ) -> PolicyVersion:
        """Validate, copy into the store and register; the same content again returns
        the existing version."""
        ...

    def get_version(self, tenant: str, name: str) -> PolicyVersion:
        """The tenant's version `name`; 404 if absent or another tenant's."""
        ...

    def list_versions(self, tenant: str) -> list[PolicyVersion]:
        """The tenant's versions, oldest first."""
        ...

    def activate(self, tenant: str, name: str, *, actor: str) -> PolicyVersion | None:
        """Serve `name` for the tenant from now on; returns the previously active one."""
        ...

    def deactivate(self, tenant: str, *, actor: str) -> None:
        """Serve the tenant with no policy."""
        ...

    def rollback(self, tenant: str, *, actor: str) -> PolicyVersion:
        """Re-activate the version active before the current one; 409 if none."""
        ...

    def active_version(self, tenant: str) -> PolicyVersion | None:
        """The version served for the tenant, None when it has none."""
        ...

    def delete_version(self, tenant: str, name: str, *, actor: str) -> None:
        """Remove an inactive version and its stored files; 409 if active."""
        ...

    def audit(self, *, tenant: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` audit entries (of one tenant when given), newest first."""
        ...

    def generation(self) -> int:
        """A counter that every change increases."""
        ...

    def pointer_changed_at(self, tenant: str) -> float | None:
        """Wall time of the tenant's last activate / rollback / deactivate, if any."""
        ...

    def snapshot(self, seen: int | None = None) -> RegistrySnapshot | None:
        """Tenants, keys, active versions and pointer times in one consistent read;
        None when the generation is still `seen`."""
        ...

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None] | None:
        """Call `on_change()` (from any thread) soon after any process changes the
        registry; returns a function that stops watching, or None when this storage
        cannot push changes (replicas then rely on polling alone)."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO state (id, generation) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    cache_salt TEXT NOT NULL,
    created_at REAL NOT NULL,
    active_version TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    lora_int_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    adapter_dir TEXT,
    policy_dir TEXT,
    created_at REAL NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_tenant ON versions (tenant);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_tenant ON history (tenant, id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    tenant TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, id);
"""

_VERSION_COLUMNS = (
    "name, tenant, content_hash, adapter_dir, policy_dir, lora_int_id, created_at, meta"
)


def _reject_symlinks(root: Path, label: str) -> None:
    """Artifacts are copied file by file into the store: a symlink inside one could pull
    any file the server can read (outside the artifact roots) into it."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise RegistryError(403, "path_not_allowed",
                                    f"{label} contains a symbolic link ({p.relative_to(root)}); "
                                    "artifacts must be plain files")


def _hash_key(api_key: str) -> str:
    """sha256 hex of an API key. Keys are high-entropy random tokens, so a fast hash
    is enough; the plain key is never stored or logged."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and `root` itself)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            fd = os.open(os.path.join(dirpath, fname), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on dirs
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SQLiteRegistry(Registry):
    """Registry kept in `<state_dir>/registry.db` with artifacts under `<state_dir>/store`.

    Thread-safe: one connection guarded by a lock; writes use `BEGIN IMMEDIATE`, so
    several processes sharing the dir serialise on SQLite's own lock (waiting up to
    `busy_timeout_s`). Copying and validating artifacts happens outside the lock,
    so registering a large adapter does not stall `tenant_for_key` on the request path.
    `base` and `max_lora_rank` are what adapters are validated against.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        base: BaseModelSpec,
        max_lora_rank: int,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if not busy_timeout_s > 0:
            raise ValueError(f"busy_timeout_s must be > 0, got {busy_timeout_s!r}")
        self._init_store(state_dir, base, max_lora_rank)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                self.state_dir / DB_FILE,
                timeout=busy_timeout_s,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self._write():
                # executescript() would commit on its own; run the statements one by
                # one inside our transaction instead.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
        except sqlite3.Error as exc:
            raise RegistryError(
                503,
                "registry_unavailable",
                f"cannot open registry {self.state_dir / DB_FILE}: {exc}",
            ) from exc
        self._clean_temp_dirs()

    def _init_store(self, state_dir: Path, base: BaseModelSpec, max_lora_rank: int) -> None:
        """Check what adapters are validated against; create `<state_dir>/store`."""
        if not isinstance(base, BaseModelSpec):
            raise ValueError(f"base must be a BaseModelSpec, got {base!r}")
        if (
            isinstance(max_lora_rank, bool)
            or not isinstance(max_lora_rank, int)
            or max_lora_rank <= 0
        ):
            raise ValueError(f"max_lora_rank must be a positive int, got {max_lora_rank!r}")
        self.state_dir = Path(state_dir).resolve()
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.store_dir = self.state_dir / STORE_DIR
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(
                503, "registry_unavailable", f"cannot create {self.store_dir}: {exc}"
            ) from exc

    # -- plumbing -----------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back on any error; sqlite
        errors (locked, read-only, disk full) become RegistryError 503."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise RegistryError(
                    503, "registry_unavailable", f"registry is unavailable: {exc}"
                ) from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                    raise RegistryError(
                        503, "registry_unavailable", f"registry is unavailable: {exc}"
                    ) from exc
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise RegistryError(
                    503, "registry_unavailable", f"registry is unavailable: {exc}"
                ) from exc

    @contextlib.contextmanager
    def _snapshot_read(self) -> Iterator[sqlite3.Connection]:
        """Several reads that see one state: a deferred (read) transaction in WAL mode."""
        with self._read() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def _changed(
        self,
        conn: sqlite3.Connection,
        actor: str,
        action: str,
        tenant: str | None,
        detail: dict[str, Any],
    ) -> None:
        """Audit row + generation bump, inside the caller's transaction."""
        conn.execute(
            "INSERT INTO audit (ts, actor, action, tenant, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, tenant, json.dumps(detail, sort_keys=True)),
        )
        conn.execute("UPDATE state SET generation = generation + 1 WHERE id = 1")
        logger.info("registry %s by %s on tenant %s: %s", action, actor, tenant, detail)

    @staticmethod
    def _check_actor(actor: str) -> None:
        if not isinstance(actor, str) or not actor.strip():
            raise RegistryError(
                400, "invalid_actor", f"actor must be a non-empty string, got {actor!r}"
            )

    @staticmethod
    def _check_key(api_key: str) -> None:
        if not isinstance(api_key, str) or len(api_key) < MIN_API_KEY_CHARS:
            # Never echo the key itself.
            raise RegistryError(
                400,
                "invalid_api_key",
                f"API key must be a string of at least {MIN_API_KEY_CHARS} characters",
            )

    @staticmethod
    def _tenant_row(conn: sqlite3.Connection, name: str) -> tuple:
        row = conn.execute(
            "SELECT name, cache_salt, created_at, active_version FROM tenants WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            raise RegistryError(404, "tenant_not_found", f"tenant {name!r} does not exist")
        return row

    @staticmethod
    def _version(row: tuple) -> PolicyVersion:
        name, tenant, chash, adapter_dir, policy_dir, lora_int_id, created_at, meta = row
        return PolicyVersion(
            name=name,
            tenant=tenant,
            content_hash=chash,
            adapter_dir=adapter_dir,
            policy_dir=policy_dir,
            lora_int_id=lora_int_id,
            created_at=created_at,
            meta=json.loads(meta),
        )

    def _version_row(self, conn: sqlite3.Connection, tenant: str, name: str) -> PolicyVersion:
        row = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE tenant = ? AND name = ?", (tenant, name)
        ).fetchone()
        if row is None:
            raise RegistryError(
                404, "version_not_found", f"tenant {tenant!r} has no policy version {name!r}"
            )
        return self._version(row)

    def _clean_temp_dirs(self) -> None:
        """Remove copies a crashed add_version left in the store (older than an hour,
        so a concurrent registration in another process is not disturbed)."""
        cutoff = time.time() - 3600
        for entry in self.store_dir.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)

    # -- tenants ------------------------------------------------------------------

    def create_tenant(self, name: str, api_key: str, *, actor: str) -> Tenant:
        """Create tenant `name` ([a-z0-9][a-z0-9_-]{0,62}) with `api_key` (>= 16 chars,
        stored as its sha256). 409 if the name or the key is taken."""
        self._check_actor(actor)
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            raise RegistryError(
                400,
                "invalid_tenant_name",
                f"tenant name {name!r} must match {TENANT_NAME.pattern}",
            )
        self._check_key(api_key)
        tenant = Tenant(name=name, cache_salt=secrets.token_hex(16), created_at=time.time())
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise RegistryError(409, "tenant_exists", f"tenant {name!r} already exists")
            if conn.execute(
                "SELECT 1 FROM tenants WHERE key_hash = ?", (_hash_key(api_key),)
            ).fetchone():
                raise RegistryError(409, "api_key_in_use", "that API key belongs to another tenant")
            conn.execute(
                "INSERT INTO tenants (name, key_hash, cache_salt, created_at, active_version) "
                "VALUES (?, ?, ?, ?, NULL)",
                (name, _hash_key(api_key), tenant.cache_salt, tenant.created_at),
            )
            self._changed(conn, actor, "create_tenant", name, {})
        return tenant

    def rotate_key(self, name: str, api_key: str, *, actor: str) -> None:
        """Replace tenant `name`'s API key. 404 unknown tenant, 409 key used by another."""
        self._check_actor(actor)
        self._check_key(api_key)
        key_hash = _hash_key(api_key)
        with self._write() as conn:
            self._tenant_row(conn, name)
            owner = conn.execute(
                "SELECT name FROM tenants WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            if owner is not None and owner[0] != name:
                raise RegistryError(409, "api_key_in_use", "that API key belongs to another tenant")
            conn.execute("UPDATE tenants SET key_hash = ? WHERE name = ?", (key_hash, name))
            self._changed(conn, actor, "rotate_key", name, {})

    def tenant_for_key(self, api_key: str) -> Tenant | None:
        """The tenant whose key is `api_key`, else None. Looks the sha256 up through
        the unique index, then compares the digests in constant time."""
        if not isinstance(api_key, str) or not api_key:
            return None
        key_hash = _hash_key(api_key)
        with self._read() as conn:
            row = conn.execute(
                "SELECT name, cache_salt, created_at, key_hash FROM tenants WHERE key_hash = ?",
                (key_hash,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[3].encode(), key_hash.encode()):
            return None
        return Tenant(name=row[0], cache_salt=row[1], created_at=row[2])

    def get_tenant(self, name: str) -> Tenant:
        """Tenant `name`; RegistryError 404 if none."""
        with self._read() as conn:
            row = self._tenant_row(conn, name)
        return Tenant(name=row[0], cache_salt=row[1], created_at=row[2])

    def list_tenants(self) -> list[Tenant]:
        """All tenants sorted by name."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, cache_salt, created_at FROM tenants ORDER BY name"
            ).fetchall()
        return [Tenant(name=r[0], cache_salt=r[1], created_at=r[2]) for r in rows]

    def delete_tenant(self, name: str, *, actor: str) -> None:
        """Delete tenant `name`, its versions and history, then its stored files."""
        self._check_actor(actor)
        with self._write() as conn:
            self._tenant_row(conn, name)
            names = [
                r[0] for r in conn.execute("SELECT name FROM versions WHERE tenant = ?", (name,))
            ]
            conn.execute("DELETE FROM history WHERE tenant = ?", (name,))
            conn.execute("DELETE FROM versions WHERE tenant = ?", (name,))
            conn.execute("DELETE FROM tenants WHERE name = ?", (name,))
            self._changed(conn, actor, "delete_tenant", name, {"versions": names})
        for vname in names:
            self._remove_store_dir(vname)

    # -- versions -----------------------------------------------------------------

    def add_version(
        self,
        tenant: str,
        *,
        adapter: Path | None,
        policy: Path | None,
        actor: str,
        meta: dict | None = None,
    ) -> PolicyVersion:
        """Register a policy version for `tenant` from an adapter dir and/or a policy dir.

        The sources are validated, copied to a temp dir in the store, fsynced,
        validated and hashed again as copied (so what is stored is what was checked
        even if the source changes meanwhile), renamed to `store/<tenant>@<hash12>`
        and only then inserted. Raises ArtifactError for a refused artifact,
        RegistryError 400 when neither part is given or `meta` is not JSON, 404 for
        an unknown tenant. Registering the same content again returns the existing
        version and changes nothing.
        """
        self._check_actor(actor)
        if adapter is None and policy is None:
            raise RegistryError(
                400, "empty_version", "a policy version needs an adapter, a policy, or both"
            )
        meta = {} if meta is None else meta
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise RegistryError(
                400, "invalid_meta", f"meta must be JSON-serialisable: {exc}"
            ) from exc
        if not isinstance(meta, dict):
            raise RegistryError(
                400, "invalid_meta", f"meta must be a JSON object, got {type(meta).__name__}"
            )
        self.get_tenant(tenant)  # 404 before any copying

        parts: dict[str, Path] = {}
        if adapter is not None:
            validate_adapter(Path(adapter), self.base, self.max_lora_rank)
            parts["adapter"] = Path(adapter)
        if policy is not None:
            validate_policy_dir(Path(policy))
            parts["policy"] = Path(policy)
        for label, src in parts.items():
            _reject_symlinks(src, label)

        tmp = self.store_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            try:
                tmp.mkdir()
                for label, src in parts.items():
                    shutil.copytree(src, tmp / label)
                _fsync_tree(tmp)
            except OSError as exc:
                raise RegistryError(
                    503, "registry_unavailable", f"cannot copy artifacts into the store: {exc}"
                ) from exc
            if "adapter" in parts:
                validate_adapter(tmp / "adapter", self.base, self.max_lora_rank)
            if "policy" in parts:
                validate_policy_dir(tmp / "policy")
            labels = list(parts)
            chash = content_hash([tmp / label for label in labels], labels=labels)
            name = f"{tenant}@{chash[:HASH_PREFIX_CHARS]}"
            final = self.store_dir / name
            with self._write() as conn:
                self._tenant_row(conn, tenant)  # may have been deleted meanwhile
                row = conn.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ?", (name,)
                ).fetchone()
                if row is not None:
                    existing = self._version(row)
                    if existing.content_hash != chash:
                        raise RegistryError(
                            409,
                            "hash_prefix_collision",
                            f"version name {name} is taken by different content",
                        )
                    logger.info("add_version: %s already registered", name)
                    return existing
                if final.exists():  # left by a crash between rename and insert
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.store_dir)
                try:
                    cur = conn.execute(
                        "INSERT INTO versions (name, tenant, content_hash, adapter_dir, "
                        "policy_dir, created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            name,
                            tenant,
                            chash,
                            str(final / "adapter") if "adapter" in parts else None,
                            str(final / "policy") if "policy" in parts else None,
                            time.time(),
                            meta_json,
                        ),
                    )
                    self._changed(
                        conn,
                        actor,
                        "add_version",
                        tenant,
                        {"version": name, "content_hash": chash, "parts": labels},
                    )
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
                lora_int_id = cur.lastrowid
            return self._version_by_id(lora_int_id)
        except OSError as exc:
            raise RegistryError(
                503, "registry_unavailable", f"cannot write the store: {exc}"
            ) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _version_by_id(self, lora_int_id: int) -> PolicyVersion:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE lora_int_id = ?", (lora_int_id,)
            ).fetchone()
        if row is None:  # deleted between insert and read
            raise RegistryError(409, "version_gone", f"version {lora_int_id} was deleted meanwhile")
        return self._version(row)

    def get_version(self, tenant: str, name: str) -> PolicyVersion:
        """Version `name` of `tenant`; 404 when absent or owned by another tenant."""
        with self._read() as conn:
            self._tenant_row(conn, tenant)
            return self._version_row(conn, tenant, name)

    def list_versions(self, tenant: str) -> list[PolicyVersion]:
        """`tenant`'s versions in registration order; 404 for an unknown tenant."""
        with self._read() as conn:
            self._tenant_row(conn, tenant)
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE tenant = ? ORDER BY lora_int_id",
                (tenant,),
            ).fetchall()
        return [self._version(r) for r in rows]

    def activate(self, tenant: str, name: str, *, actor: str) -> PolicyVersion | None:
        """Make `name` the tenant's active version; returns the one active before (None
        if none). The previous one is pushed on the rollback history. Activating the
        version already active changes nothing."""
        self._check_actor(actor)
        with self._write() as conn:
            row = self._tenant_row(conn, tenant)
            target = self._version_row(conn, tenant, name)
            current_name = row[3]
            previous = self._version_row(conn, tenant, current_name) if current_name else None
            if current_name == target.name:
                return previous
            if current_name is not None:
                conn.execute(
                    "INSERT INTO history (tenant, version) VALUES (?, ?)", (tenant, current_name)
                )
            conn.execute(
                "UPDATE tenants SET active_version = ? WHERE name = ?", (target.name, tenant)
            )
            self._changed(
                conn, actor, "activate", tenant, {"version": target.name, "previous": current_name}
            )
        return previous

    def deactivate(self, tenant: str, *, actor: str) -> None:
        """Serve `tenant` with no policy; the version active until now goes on the
        rollback history. No change when none is active."""
        self._check_actor(actor)
        with self._write() as conn:
            current_name = self._tenant_row(conn, tenant)[3]
            if current_name is None:
                return
            conn.execute(
                "INSERT INTO history (tenant, version) VALUES (?, ?)", (tenant, current_name)
            )
            conn.execute("UPDATE tenants SET active_version = NULL WHERE name = ?", (tenant,))
            self._changed(conn, actor, "deactivate", tenant, {"previous": current_name})

    def rollback(self, tenant: str, *, actor: str) -> PolicyVersion:
        """Re-activate the version that was active before the current one (popping the
        history stack; entries equal to the current version are skipped). 409
        "no_rollback_target" when the history is empty."""
        self._check_actor(actor)
        with self._write() as conn:
            current_name = self._tenant_row(conn, tenant)[3]
            while True:
                top = conn.execute(
                    "SELECT id, version FROM history WHERE tenant = ? ORDER BY id DESC LIMIT 1",
                    (tenant,),
                ).fetchone()
                if top is None:
                    raise RegistryError(
                        409,
                        "no_rollback_target",
                        f"tenant {tenant!r} has no earlier version to roll back to",
                    )
                conn.execute("DELETE FROM history WHERE id = ?", (top[0],))
                if top[1] != current_name:
                    break
            target = self._version_row(conn, tenant, top[1])
            conn.execute(
                "UPDATE tenants SET active_version = ? WHERE name = ?", (target.name, tenant)
            )
            self._changed(
                conn, actor, "rollback", tenant, {"version": target.name, "previous": current_name}
            )
        return target

    def active_version(self, tenant: str) -> PolicyVersion | None:
        """The version served for `tenant`, None when it has none; 404 unknown tenant."""
        with self._read() as conn:
            current_name = self._tenant_row(conn, tenant)[3]
            return self._version_row(conn, tenant, current_name) if current_name else None

    def delete_version(self, tenant: str, name: str, *, actor: str) -> None:
        """Delete an inactive version (409 "version_active" if active): the row and its
        rollback-history entries first, then its store files. Its lora_int_id is never
        given out again. Files vLLM already loaded stay in vLLM's memory."""
        self._check_actor(actor)
        with self._write() as conn:
            current_name = self._tenant_row(conn, tenant)[3]
            self._version_row(conn, tenant, name)
            if current_name == name:
                raise RegistryError(
                    409,
                    "version_active",
                    f"version {name} is active for {tenant!r}; activate another first",
                )
            conn.execute("DELETE FROM history WHERE tenant = ? AND version = ?", (tenant, name))
            conn.execute("DELETE FROM versions WHERE name = ?", (name,))
            self._changed(conn, actor, "delete_version", tenant, {"version": name})
        self._remove_store_dir(name)

    def _remove_store_dir(self, name: str) -> None:
        path = self.store_dir / name
        if path.parent != self.store_dir:  # names are validated, but never leave the store
            raise RegistryError(400, "invalid_version_name", f"bad version name {name!r}")
        shutil.rmtree(path, ignore_errors=True)

    # -- audit / generation ---------------------------------------------------------

    def audit(self, *, tenant: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest-first audit entries, all or one tenant's; `limit` in 1..10000."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise RegistryError(
                400, "invalid_limit", f"limit must be an int in 1..10000, got {limit!r}"
            )
        with self._read() as conn:
            if tenant is None:
                rows = conn.execute(
                    "SELECT id, ts, actor, action, tenant, detail FROM audit "
                    "ORDER BY id DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT id, ts, actor, action, tenant, detail FROM audit WHERE tenant = ? "
                    "ORDER BY id DESC LIMIT ?",
                    (tenant, limit),
                ).fetchall()
        return [
            AuditEntry(
                id=r[0], ts=r[1], actor=r[2], action=r[3], tenant=r[4], detail=json.loads(r[5])
            )
            for r in rows
        ]

    def check_writable(self) -> None:
        """Raise RegistryError 503 unless a write transaction can run now (health probe)."""
        with self._write() as conn:
            conn.execute("UPDATE state SET generation = generation WHERE 1 = 0")

    def key_index(self) -> dict[str, str]:
        """sha256(key) -> tenant name: lets a server keep serving from memory while the
        registry cannot be read (keys stay hashed; nothing raw leaves the database)."""
        with self._read() as conn:
            return {h: name for name, h in conn.execute("SELECT name, key_hash FROM tenants")}

    def pointer_changed_at(self, tenant: str) -> float | None:
        """Wall time (the audit row's) of the tenant's last activate, rollback or
        deactivate; None when its pointer never moved. Replicas use it to measure how
        long a change took to reach them."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT MAX(ts) FROM audit WHERE tenant = ? "
                "AND action IN ('activate', 'rollback', 'deactivate')",
                (tenant,),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def snapshot(self, seen: int | None = None) -> RegistrySnapshot | None:
        """What a replica mirrors, in one transaction and four queries; None when the
        generation is still `seen` (then only the counter was read)."""
        with self._snapshot_read() as conn:
            gen = int(conn.execute("SELECT generation FROM state WHERE id = 1").fetchone()[0])
            if gen == seen:
                return None
            rows = conn.execute(
                "SELECT name, cache_salt, created_at, key_hash, active_version FROM tenants "
                "ORDER BY name"
            ).fetchall()
            versions = {
                r[0]: self._version(r)
                for r in conn.execute(
                    f"SELECT {', '.join('v.' + c.strip() for c in _VERSION_COLUMNS.split(','))}"
                    " FROM versions v JOIN tenants t ON t.active_version = v.name"
                ).fetchall()
            }
            moved = dict(conn.execute(
                "SELECT tenant, MAX(ts) FROM audit WHERE tenant IS NOT NULL "
                "AND action IN ('activate', 'rollback', 'deactivate') GROUP BY tenant"
            ).fetchall())
        return RegistrySnapshot(
            generation=gen,
            tenants=[Tenant(name=r[0], cache_salt=r[1], created_at=r[2]) for r in rows],
            keys={r[3]: r[0] for r in rows},
            active={r[0]: versions.get(r[4]) if r[4] else None for r in rows},
            changed_at={r[0]: None if moved.get(r[0]) is None else float(moved[r[0]])
                        for r in rows},
        )

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None] | None:
        """SQLite cannot push changes to other processes: None (replicas poll)."""
        return None

    def generation(self) -> int:
        """The change counter, read from the database (so other processes' changes count)."""
        with self._read() as conn:
            return int(conn.execute("SELECT generation FROM state WHERE id = 1").fetchone()[0])
