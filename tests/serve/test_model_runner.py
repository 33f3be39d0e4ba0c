"""Model Runner V2 decision: unlearnd pins vLLM's V1 model runner (see
`unlearnd.serve.engine.pin_v1_model_runner`). These tests fail loudly the day vLLM stops
honouring the pin or removes the V1 logits-processor interface our processor uses."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from unlearnd.serve.engine import pin_v1_model_runner


def test_pin_sets_v1_and_vllm_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.envs as envs
    from vllm.config import VllmConfig

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    pin_v1_model_runner()
    assert envs.VLLM_USE_V2_MODEL_RUNNER is False
    # VllmConfig.use_v2_model_runner on a config with none of the features that force V2
    fake = SimpleNamespace(attention_config=SimpleNamespace(hisparse_config=None),
                           watermark_config=None)
    assert VllmConfig.use_v2_model_runner.fget(fake) is False


def test_v2_override_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="V1 model runner only"):
        pin_v1_model_runner()


def test_v1_logits_processor_interface_exists() -> None:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

    from unlearnd.guards.processor import UnlearningLogitsProcessor

    assert issubclass(UnlearningLogitsProcessor, LogitsProcessor)
    for name in ("apply", "update_state", "is_argmax_invariant", "validate_params"):
        assert callable(getattr(LogitsProcessor, name, None)), name
    fields = {f for f in ("added", "removed", "moved", "batch_size")
              if hasattr(BatchUpdate, f) or f in inspect.signature(BatchUpdate).parameters}
    assert fields == {"added", "removed", "moved", "batch_size"}


def test_features_that_force_v2_are_refused_at_start() -> None:
    from unlearnd.serve.vllm_args import FORBIDDEN

    assert "watermark" in FORBIDDEN and "watermark_config" in FORBIDDEN
