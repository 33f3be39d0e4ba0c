"""Shared fixtures: the FakeEngine app harness's `app` and `fake_guards`
(tests/serve/fakes.py)."""

pytest_plugins = ("tests.serve.fakes",)
