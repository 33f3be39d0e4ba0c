"""`vllm serve` flags for the engine and frontend, parsed by vLLM's own parser.

`unlearnd serve MODEL [any vllm serve flag] [--config unlearnd.yaml]`: the config's
`engine:` settings become flags first (aliases kept for config files), the operator's
flags come after them (the last one wins, as in argparse), and what unlearnd needs is
set last on the parsed namespace. A flag that would let a token escape the tenant
policy fails at start with :class:`FlagError` saying why (:data:`FORBIDDEN`).
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from unlearnd.serve.config import ServerConfig

PROCESSOR_FQCN = "unlearnd.guards.processor:UnlearningLogitsProcessor"
LOGPROBS_MODE = "processed_logprobs"
"""vLLM ``logprobs_mode`` the engine runs with: log-softmax of the logits the sampler
drew from (after allowed/bad words, logit_bias, our processor, penalties, temperature,
min-p, top-k/top-p; greedy rows: before temperature)."""


class FlagError(ValueError):
    """A vLLM flag or environment setting unlearnd cannot serve under a policy."""


def _truthy(v: Any) -> bool:
    return v not in (None, False, 0, "", [], (), {})


FORBIDDEN: dict[str, str] = {
    "api_key": "tenant API keys are unlearnd's (the registry); vLLM's --api-key would "
               "replace them with one shared key and leave routes unguarded",
    "speculative_config": "draft tokens are proposed and accepted outside the unlearning "
                          "logits processor (vLLM refuses custom processors with it too)",
    "lora_modules": "adapters are the tenants' policy versions, registered through the "
                    "registry; a static --lora-modules adapter would bypass it",
    "logits_processors": "unlearnd registers its own processor; another one could run "
                         "after it and undo a policy decision",
    "logits_processor_pattern": "it lets a request name logits processors to run",
    "tool_server": "server-side tools run outside the policy (their output is not guarded)",
    "trust_request_chat_template": "a client's chat template changes what the scope guard "
                                   "reads from what the model reads",
    "return_tokens_as_token_ids": "not supported under a policy",
    "headless": "the tenant edge runs in this process: an engine without it is unguarded",
    "enable_log_outputs": "generated text would go to the logs unfiltered by tenant",
    "watermark": "watermarking forces Model Runner V2, which rejects unlearnd's (V1) "
                 "logits processor",
    "watermark_config": "watermarking forces Model Runner V2, which rejects unlearnd's (V1) "
                        "logits processor",
}
"""Namespace attribute -> why it is refused when set."""

FORBIDDEN_ENV: dict[str, str] = {
    "VLLM_SERVER_DEV_MODE": "dev-mode routes (reset caches, sleep, collective RPC) are "
                            "not under the tenant edge",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "runtime LoRA routes would let a client load or "
                                        "replace adapters outside the registry",
    "VLLM_ENABLE_RESPONSES_API_STORE": "stored responses are readable by id across tenants",
}


def _engine_flags(config: ServerConfig) -> list[str]:
    """The config's `engine:` settings as `vllm serve` flags (aliases)."""
    e = config.engine
    flags = ["--max-loras", str(e.max_loras), "--max-lora-rank", str(e.max_lora_rank),
             "--max-cpu-loras", str(e.max_cpu_loras), "--max-model-len",
             str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs), "--dtype", e.dtype,
             "--tensor-parallel-size", str(e.tensor_parallel_size),
             "--pipeline-parallel-size", str(e.pipeline_parallel_size),
             "--gpu-memory-utilization", str(e.gpu_memory_utilization),
             "--seed", str(e.seed),
             "--enable-prefix-caching" if e.enable_prefix_caching
             else "--no-enable-prefix-caching"]
    if e.enforce_eager:
        flags.append("--enforce-eager")
    if e.kv_cache_memory_bytes is not None:
        flags += ["--kv-cache-memory-bytes", str(e.kv_cache_memory_bytes)]
    return flags


def parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="unlearnd serve"))


def engine_namespace(config: ServerConfig, env: dict[str, str] | None = None) -> Namespace:
    """vLLM's parsed `serve` namespace for this config (raises FlagError / ValueError)."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    env = os.environ if env is None else env
    for name, why in FORBIDDEN_ENV.items():
        if env.get(name, "0") not in ("", "0", "false", "False"):
            raise FlagError(f"{name} is set: {why}; unset it to serve with unlearnd")
    user = list(config.vllm_args)
    try:
        args = parser().parse_args(["--model", str(config.model), *_engine_flags(config),
                                    *user])
    except SystemExit as e:  # argparse already printed the reason
        raise FlagError(f"vLLM flags not understood: {' '.join(user)}") from e
    tag = getattr(args, "model_tag", None)
    if tag is not None and str(tag) != str(config.model):
        raise FlagError(f"unexpected positional argument {tag!r}: the model is "
                        f"{config.model} (give it once, as MODEL, --model or in the config)")
    for name, why in FORBIDDEN.items():
        if _truthy(getattr(args, name, None)):
            raise FlagError(f"--{name.replace('_', '-')} is not allowed: {why}")
    mode = getattr(args, "logprobs_mode", None)
    if "--logprobs-mode" in " ".join(user) and str(mode) != LOGPROBS_MODE:
        raise FlagError(f"--logprobs-mode {mode} is not allowed: returned logprobs must "
                        f"be those the policy sampled from ({LOGPROBS_MODE}); other modes "
                        "show the model before the unlearning logits processor")
    if getattr(args, "api_server_count", None) not in (None, 1):
        raise FlagError("--api-server-count must be 1: the tenant edge runs in this "
                        "process; scale out with replicas (deploy/README.md)")
    if not getattr(args, "enable_lora", True) and "--no-enable-lora" in user:
        raise FlagError("--no-enable-lora is not allowed: every request is served "
                        "with its tenant's adapter (the identity adapter without one)")
    args.enable_lora = True
    args.logits_processors = [PROCESSOR_FQCN]
    args.logprobs_mode = LOGPROBS_MODE
    args.served_model_name = [config.model_name]
    args.disable_log_stats = False
    args.api_key = None
    validate_parsed_serve_args(args)
    return args
