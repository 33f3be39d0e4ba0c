"""PostgresRegistry (unlearnd.serve.registry_pg): the SQLite registry's behaviour on PostgreSQL.

The behavioural tests of tests/serve/test_registry.py run here unchanged against a fresh
PostgreSQL database per test: they are imported, and the ones that build registries
themselves get `SQLiteRegistry` swapped for a PostgresRegistry factory on the same
database. Tests tied to SQLite's files (key bytes in registry.db, a locked db file) have
PostgreSQL counterparts below, plus two instances (two replicas) on one database.

Needs a PostgreSQL server: `scripts/ci_services.sh` starts one and writes its URL to
.cache/database_url (or set UNLEARND_TEST_DATABASE_URL; the user must be allowed to
CREATE DATABASE). Without one these tests skip.
"""
# Fixtures imported from test_registry.py are named again as test arguments (how pytest
# fixtures work), which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import tests.serve.test_registry as sqlite_tests
from tests.serve.test_registry import (  # noqa: F401  (fixtures and tests collected here)
    KEY_A,
    KEY_B,
    base,
    built,
    make_policy,
    state,
    store_entries,
    test_activate_rollback_deactivate,
    test_add_version_copies_into_store,
    test_add_version_parts_and_ids,
    test_audit_and_generation,
    test_concurrent_activations_stay_consistent,
    test_constructor_validation,
    test_corrupt_artifacts_leave_no_trace,
    test_create_tenant_rejections,
    test_delete_tenant,
    test_delete_version,
    test_lora_id_not_reused_after_readding,
    test_pointer_changed_at,
    test_restart_keeps_state,
    test_same_content_is_idempotent,
    test_snapshot_is_what_the_single_reads_say,
    test_unknown_tenant_404,
    test_versions_are_private_to_their_tenant,
    three,
)
from unlearnd.serve.artifacts import BaseModelSpec
from unlearnd.serve.registry import RegistryError

psycopg = pytest.importorskip("psycopg", reason='needs psycopg: pip install "psycopg[binary]"')

from unlearnd.serve.registry_pg import WRITE_LOCK_KEY, PostgresRegistry, redact_url  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
URL_FILE = REPO / ".cache" / "database_url"


def admin_database_url() -> str | None:
    """The test server's URL: UNLEARND_TEST_DATABASE_URL, else what ci_services.sh wrote."""
    url = os.environ.get("UNLEARND_TEST_DATABASE_URL")
    if not url and URL_FILE.is_file():
        url = URL_FILE.read_text().strip()
    return url or None


def require_postgres() -> str:
    """The admin URL of a reachable PostgreSQL server, or skip the test saying why."""
    url = admin_database_url()
    if url is None:
        pytest.skip("no PostgreSQL: run scripts/ci_services.sh or set UNLEARND_TEST_DATABASE_URL")
    try:
        with psycopg.connect(url, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL at {redact_url(url)} is not reachable: {exc}")
    return url


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """Create an empty database on the server of `admin_url`, yield its URL, drop it."""
    name = f"unlearnd_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def pg_url() -> Iterator[str]:
    with fresh_database(require_postgres()) as url:
        yield url


@pytest.fixture(autouse=True)
def registries_on_postgres(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    """Imported tests that build `SQLiteRegistry(state, ...)` get a PostgresRegistry on
    this test's database instead (busy_timeout_s maps to lock_timeout_s)."""

    def factory(state_dir: Path, *, base: BaseModelSpec, max_lora_rank: int,
                busy_timeout_s: float = 5.0) -> PostgresRegistry:
        return PostgresRegistry(pg_url, state_dir, base=base, max_lora_rank=max_lora_rank,
                                lock_timeout_s=busy_timeout_s)

    monkeypatch.setattr(sqlite_tests, "SQLiteRegistry", factory)


@pytest.fixture()
def reg(pg_url: str, state: Path, base: BaseModelSpec) -> Iterator[PostgresRegistry]:
    registry = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    registry.create_tenant("acme", KEY_A, actor="op")
    registry.create_tenant("globex", KEY_B, actor="op")
    yield registry
    registry.close()


def _dump(url: str) -> str:
    """Every row of every registry table, as text."""
    with psycopg.connect(url) as conn:
        return " ".join(
            str(row)
            for table in ("state", "tenants", "versions", "history", "audit")
            for row in conn.execute(f"SELECT * FROM {table}").fetchall()
        )


# -- PostgreSQL counterparts of the SQLite-file tests -----------------------------------


def test_tenants_and_keys_stored_hashed(reg: PostgresRegistry, pg_url: str) -> None:
    assert [t.name for t in reg.list_tenants()] == ["acme", "globex"]
    assert reg.tenant_for_key(KEY_A).name == "acme"
    assert reg.tenant_for_key(KEY_A + "x") is None and reg.tenant_for_key("") is None
    reg.rotate_key("acme", "new-key-for-acme-123", actor="op")
    assert reg.tenant_for_key(KEY_A) is None
    assert reg.tenant_for_key("new-key-for-acme-123").name == "acme"
    dump = _dump(pg_url)
    assert "acme" in dump  # the dump does see the tables
    for key in (KEY_A, KEY_B, "new-key-for-acme-123"):
        assert key not in dump


def test_write_lock_held_elsewhere_is_503_and_changes_nothing(
    pg_url: str, state: Path, base: BaseModelSpec, built: dict
) -> None:
    reg = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8, lock_timeout_s=0.2)
    reg.create_tenant("acme", KEY_A, actor="op")
    v = reg.add_version("acme", adapter=built["adapter"], policy=None, actor="op")
    gen = reg.generation()
    with psycopg.connect(pg_url) as blocker:  # a replica stuck inside a write
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
        with pytest.raises(RegistryError) as exc:
            reg.activate("acme", v.name, actor="op")
        assert (exc.value.status, exc.value.code) == (503, "registry_unavailable")
        with pytest.raises(RegistryError) as exc:
            reg.add_version("acme", adapter=built["adapter2"], policy=None, actor="op")
        assert exc.value.status == 503
        # Reads do not take the write lock: the request path keeps working.
        assert reg.tenant_for_key(KEY_A).name == "acme"
        blocker.rollback()
    assert reg.active_version("acme") is None
    assert reg.generation() == gen
    assert store_entries(reg) == {v.name}  # the refused copy was cleaned up
    assert reg.activate("acme", v.name, actor="op") is None  # works again once released
    reg.close()


def test_lost_connection_is_503_then_reconnects(
    reg: PostgresRegistry, pg_url: str, three: list
) -> None:
    gen = reg.generation()
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'unlearnd'"
        ).fetchall()
    assert killed and all(row[0] for row in killed)
    with pytest.raises(RegistryError) as exc:
        reg.activate("acme", three[0].name, actor="op")
    assert (exc.value.status, exc.value.code) == (503, "registry_unavailable")
    assert reg.generation() == gen  # reconnected; the failed write left nothing
    assert reg.active_version("acme") is None
    assert reg.activate("acme", three[0].name, actor="op") is None
    assert reg.generation() == gen + 1


def test_unreachable_database_is_503_without_the_password(
    tmp_path: Path, base: BaseModelSpec
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://someone:s3cret-pass@127.0.0.1:{port}/nowhere"
    with pytest.raises(RegistryError) as exc:
        PostgresRegistry(url, tmp_path / "st", base=base, max_lora_rank=8, connect_timeout_s=2)
    assert (exc.value.status, exc.value.code) == (503, "registry_unavailable")
    assert "s3cret-pass" not in str(exc.value)
    assert redact_url(url) == f"postgresql://someone:***@127.0.0.1:{port}/nowhere"


def test_pg_constructor_validation(pg_url: str, state: Path, base: BaseModelSpec) -> None:
    with pytest.raises(ValueError, match="database_url"):
        PostgresRegistry("sqlite:///x.db", state, base=base, max_lora_rank=8)
    with pytest.raises(ValueError, match="lock_timeout_s"):
        PostgresRegistry(pg_url, state, base=base, max_lora_rank=8, lock_timeout_s=0)
    with pytest.raises(ValueError, match="max_lora_rank"):
        PostgresRegistry(pg_url, state, base=base, max_lora_rank=True)


# -- two replicas on one database ----------------------------------------------------------


def test_two_instances_see_each_others_changes(
    pg_url: str, state: Path, base: BaseModelSpec, built: dict, tmp_path: Path
) -> None:
    a = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    b = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    gen = b.generation()
    a.create_tenant("acme", KEY_A, actor="replica-a")
    assert b.generation() == gen + 1
    assert b.tenant_for_key(KEY_A) == a.get_tenant("acme")
    v1 = a.add_version("acme", adapter=built["adapter"], policy=None, actor="replica-a")
    v2 = b.add_version("acme", adapter=None, policy=make_policy(tmp_path / "p", 3),
                       actor="replica-b")
    assert a.list_versions("acme") == b.list_versions("acme") == [v1, v2]
    assert v1.lora_int_id != v2.lora_int_id
    # Same content registered through the other replica: the same version, no change.
    gen = a.generation()
    assert b.add_version("acme", adapter=built["adapter"], policy=None, actor="replica-b") == v1
    assert a.generation() == gen
    a.activate("acme", v1.name, actor="replica-a")
    b.activate("acme", v2.name, actor="replica-b")
    assert a.active_version("acme") == v2
    assert a.rollback("acme", actor="replica-a") == v1
    assert b.active_version("acme") == v1
    with pytest.raises(RegistryError) as exc:
        b.delete_version("acme", v1.name, actor="replica-b")
    assert exc.value.code == "version_active"
    assert [(e.action, e.actor) for e in b.audit(tenant="acme", limit=3)] == [
        ("rollback", "replica-a"), ("activate", "replica-b"), ("activate", "replica-a")]
    a.close()
    b.close()


def test_replicas_racing_to_create_the_same_tenant(
    pg_url: str, state: Path, base: BaseModelSpec
) -> None:
    """Check-then-insert is atomic across instances: exactly one create wins, the
    others get the documented 409, never an integrity error or a 503."""
    regs = [PostgresRegistry(pg_url, state, base=base, max_lora_rank=8) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(regs))

    def create(r: PostgresRegistry) -> None:
        barrier.wait()
        try:
            r.create_tenant("acme", KEY_A, actor="race")
            outcomes.append("created")
        except RegistryError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=create, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] + ["tenant_exists"] * 3
    assert [e.action for e in regs[0].audit()] == ["create_tenant"]
    for r in regs:
        r.close()


# -- pushed changes: LISTEN/NOTIFY -----------------------------------------------------------


def _watching(registry: PostgresRegistry) -> tuple[threading.Event, list[float], object]:
    """Start `registry.watch`; (event set on every callback, callback times, stop)."""
    fired = threading.Event()
    times: list[float] = []

    def on_change() -> None:
        times.append(time.monotonic())
        fired.set()

    stop = registry.watch(on_change)
    assert fired.wait(10), "no callback after the listener connected"
    fired.clear()
    return fired, times, stop


def test_watch_is_woken_by_another_instances_commit(
    pg_url: str, state: Path, base: BaseModelSpec, three: list
) -> None:
    """A change committed through replica A wakes replica B's watcher (which polls
    nothing); a transaction that rolls back notifies no one."""
    a = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    b = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    fired, times, stop = _watching(b)
    try:
        t0 = time.monotonic()
        a.activate("acme", three[0].name, actor="replica-a")
        assert fired.wait(5), "B was not notified of A's activation"
        assert times[-1] - t0 < 5
        fired.clear()
        with pytest.raises(RegistryError):  # fails inside its transaction: rolled back
            a.activate("acme", "acme@nonexistent00", actor="replica-a")
        assert not fired.wait(1.5)
        a.activate("acme", three[1].name, actor="replica-a")
        assert fired.wait(5)
    finally:
        stop()
        a.close()
        b.close()


def test_watch_reconnects_and_reports_what_it_may_have_missed(
    pg_url: str, state: Path, base: BaseModelSpec, three: list
) -> None:
    """The listening connection killed: the watcher reconnects, calls back once for
    whatever changed meanwhile, and is woken by later changes again."""
    a = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    fired, times, stop = _watching(a)
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'unlearnd-listen'"
            ).fetchall()
        assert killed and all(row[0] for row in killed)
        assert fired.wait(10), "no callback after reconnecting"
        fired.clear()
        a.activate("acme", three[1].name, actor="op")
        assert fired.wait(5), "not woken after reconnecting"
    finally:
        stop()
        a.close()


def test_stopping_the_watch_ends_its_thread(pg_url: str, state: Path, base: BaseModelSpec
                                            ) -> None:
    a = PostgresRegistry(pg_url, state, base=base, max_lora_rank=8)
    _, _, stop = _watching(a)
    stop()
    assert not any(t.name == "unlearnd-registry-listen" and t.is_alive()
                   for t in threading.enumerate())
    a.close()
