"""Our kernels live under `unlearnd.kernels`, never a top-level `kernels`.

HF publishes a distribution named `kernels`; `transformers.utils.is_kernels_available()`
probes for a top-level module of that name and would then try to use ours. Each
check runs in a fresh interpreter, because transformers caches the answer
(`functools.lru_cache`) and an earlier import in the pytest process would hide a
change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib.util, json, sys
order = sys.argv[1]
if order == "ours_first":
    import unlearnd.kernels
    import unlearnd.kernels.contrastive
import transformers.utils
out = {
    "available": transformers.utils.is_kernels_available(),
    "spec": importlib.util.find_spec("kernels") is not None,
}
if order == "transformers_first":
    import unlearnd.kernels
    import unlearnd.kernels.contrastive
    transformers.utils.is_kernels_available.cache_clear()
    out["available_after"] = transformers.utils.is_kernels_available()
    out["spec_after"] = importlib.util.find_spec("kernels") is not None
print(json.dumps(out))
"""


def _probe(order: str) -> dict[str, bool]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, order],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_unavailable_after_importing_ours_first() -> None:
    out = _probe("ours_first")
    assert out["available"] is False
    assert out["spec"] is False


def test_importing_ours_does_not_flip_is_kernels_available() -> None:
    out = _probe("transformers_first")
    assert out["available"] is False
    assert out["available_after"] is False
    assert out["spec_after"] is False


def test_no_top_level_kernels_package_in_checkout() -> None:
    assert not (ROOT / "kernels").exists()
    assert (ROOT / "unlearnd" / "kernels" / "__init__.py").is_file()
