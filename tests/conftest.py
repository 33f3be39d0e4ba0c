"""Shared fixtures: the FakeEngine app harness's `app` and `fake_guards`
(tests/serve/fakes.py), and isolation of the guard-argument signing key."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from unlearnd.guards.signing import KEY_ENV

pytest_plugins = ("tests.serve.fakes",)


@pytest.fixture(autouse=True)
def _signing_key_stays_in_its_test() -> Iterator[None]:
    """The app's startup exports its signing key (`ensure_key`) into this process's
    environment; once set, the logits processor refuses unsigned arguments. Restore the
    environment after every test so that never leaks into the next one."""
    before = os.environ.get(KEY_ENV)
    yield
    if before is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = before
