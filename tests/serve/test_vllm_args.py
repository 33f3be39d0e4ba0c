"""`vllm serve` flags through `unlearnd.serve.vllm_args.engine_namespace` (vLLM's parser).

Refusals (FlagError naming the flag or variable): every FORBIDDEN flag and FORBIDDEN_ENV
variable, a `--logprobs-mode` other than processed_logprobs, `--api-server-count` > 1,
`--no-enable-lora`, an unknown flag. Pass-through: the config's `engine:` settings
become flags, the operator's flags come after them (and win), ordinary vLLM flags reach
the namespace unchanged, and what unlearnd needs is forced last. The CLI refuses before
loading anything (exit 2, the reason on stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.serve.fakes import make_config, tiny_world
from unlearnd.serve.vllm_args import (
    FORBIDDEN,
    FORBIDDEN_ENV,
    LOGPROBS_MODE,
    PROCESSOR_FQCN,
    FlagError,
    engine_namespace,
    parser,
)

ROOT = Path(__file__).resolve().parents[2]

# A value that sets each FORBIDDEN attribute (boolean flags need none: see _forbidden_flags).
FLAG_VALUES: dict[str, list[str]] = {
    "api_key": ["--api-key", "sk-shared"],
    "speculative_config": ["--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": 2, '
                           '"prompt_lookup_max": 2}'],
    "lora_modules": ["--lora-modules", "sneaky=/tmp/adapter"],
    "logits_processors": ["--logits-processors", "some.module:Processor"],
    "tool_server": ["--tool-server", "demo"],
    "watermark": ["--watermark", "0.5"],
    "watermark_config": ["--watermark-config", '{"delta": 2.0}'],
}
OTHER_FORMS: list[tuple[str, list[str]]] = [
    ("api_key", ["--api-key=sk-shared"]),
    ("api_key", ["--api_key", "sk-shared"]),
    ("api_key", ["--api-k", "sk-shared"]),  # argparse abbreviation
    ("api_key", ["--api-key", "a", "b"]),
    ("speculative_config", ["-sc", '{"method": "ngram", "num_speculative_tokens": 2}']),
    ("speculative_config", ["--speculative-config.method", "ngram",
                            "--speculative-config.num_speculative_tokens", "2"]),
    ("lora_modules", ["--lora-modules", '{"name": "sneaky", "path": "/tmp/adapter"}']),
    ("headless", ["--headless", "--data-parallel-size", "1"]),
]


@pytest.fixture(scope="module")
def actions() -> dict[str, list[Any]]:
    """vLLM's parser actions by namespace attribute."""
    out: dict[str, list[Any]] = {}
    for a in parser()._actions:
        out.setdefault(a.dest, []).append(a)
    return out


def ns(*flags: str, env: dict[str, str] | None = None, **overrides: Any):
    """engine_namespace for a config on the tiny base (state under a throwaway dir)."""
    state = tiny_world()["root"] / "vllm-args-state"
    return engine_namespace(make_config(state, vllm_args=list(flags), **overrides),
                            env={} if env is None else env)


def _flags_for(name: str, actions: dict[str, list[Any]]) -> list[str] | None:
    """Flags that set `name` to a truthy value (None: vLLM has no flag for it)."""
    if name in FLAG_VALUES:
        return FLAG_VALUES[name]
    acts = actions.get(name)
    if not acts:
        return None
    act = acts[0]
    if act.nargs == 0:  # store_true / BooleanOptionalAction: the positive form
        return [next(o for o in act.option_strings if not o.startswith("--no-"))]
    raise AssertionError(f"FORBIDDEN[{name!r}] takes a value ({act.option_strings}): add an "
                         "example to FLAG_VALUES in tests/serve/test_vllm_args.py")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_every_forbidden_flag_is_refused_by_name(name: str, actions) -> None:
    flags = _flags_for(name, actions)
    if flags is None:
        pytest.skip(f"vLLM's parser has no flag setting {name} (FORBIDDEN entry kept for "
                    "a vLLM that has one)")
    with pytest.raises(FlagError) as e:
        ns(*flags)
    assert f"--{name.replace('_', '-')} is not allowed" in str(e.value), str(e.value)
    assert FORBIDDEN[name] in str(e.value)


@pytest.mark.parametrize(("name", "flags"), OTHER_FORMS,
                         ids=[" ".join(f) for _, f in OTHER_FORMS])
def test_forbidden_flag_spellings_are_refused(name: str, flags: list[str]) -> None:
    """`=`, underscores, abbreviations, short options, dotted JSON keys: all land on the
    same namespace attribute, which is what is checked."""
    with pytest.raises(FlagError, match=f"--{name.replace('_', '-')} is not allowed"):
        ns(*flags)


def test_forbidden_flags_in_the_config_file_are_refused_too() -> None:
    """`vllm_args:` in the YAML config go through the same check as the command line."""
    state = tiny_world()["root"] / "vllm-args-state"
    cfg = make_config(state, vllm_args=["--enable-log-outputs"])
    with pytest.raises(FlagError, match="--enable-log-outputs is not allowed"):
        engine_namespace(cfg, env={})


def test_forbidden_boolean_flags_off_are_fine() -> None:
    args = ns("--no-trust-request-chat-template", "--no-enable-log-outputs",
              "--no-return-tokens-as-token-ids", "--watermark", "0")
    assert not args.trust_request_chat_template and not args.enable_log_outputs


@pytest.mark.parametrize("value", ["1", "true", "True", "TRUE", "yes", " 1"])
@pytest.mark.parametrize("var", sorted(FORBIDDEN_ENV))
def test_every_forbidden_env_var_is_refused_by_name(var: str, value: str) -> None:
    with pytest.raises(FlagError) as e:
        ns(env={var: value})
    assert str(e.value).startswith(f"{var} is set"), str(e.value)
    assert FORBIDDEN_ENV[var] in str(e.value)


@pytest.mark.parametrize("value", ["0", "", "false", "False"])
@pytest.mark.parametrize("var", sorted(FORBIDDEN_ENV))
def test_forbidden_env_var_unset_values_are_fine(var: str, value: str) -> None:
    ns(env={var: value})


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    state = tiny_world()["root"] / "vllm-args-state"
    cfg = make_config(state)
    var = sorted(FORBIDDEN_ENV)[0]
    monkeypatch.setenv(var, "1")
    with pytest.raises(FlagError, match=var):
        engine_namespace(cfg)
    monkeypatch.delenv(var)
    engine_namespace(cfg)


@pytest.mark.parametrize("flags", [
    ["--logprobs-mode", "raw_logprobs"],
    ["--logprobs-mode=raw_logprobs"],
    ["--logprobs-mode", "raw_logits"],
    ["--logprobs-mode", "processed_logits"],
    ["--logprobs-mode", "processed_logprobs", "--logprobs-mode", "raw_logprobs"],
], ids=lambda f: " ".join(f))
def test_logprobs_mode_other_than_processed_is_refused(flags: list[str]) -> None:
    with pytest.raises(FlagError, match="--logprobs-mode .* is not allowed") as e:
        ns(*flags)
    assert LOGPROBS_MODE in str(e.value)


def test_logprobs_mode_processed_is_accepted() -> None:
    assert ns("--logprobs-mode", "processed_logprobs").logprobs_mode == LOGPROBS_MODE


@pytest.mark.parametrize("flags", [["--logprobs-m", "raw_logprobs"],
                                   ["--logprobs_mode", "raw_logprobs"]],
                         ids=lambda f: " ".join(f))
def test_logprobs_mode_other_spellings_never_serve_another_mode(flags: list[str]) -> None:
    """Refused, or (a spelling the string check misses) overridden: never served."""
    try:
        args = ns(*flags)
    except FlagError:
        return
    assert args.logprobs_mode == LOGPROBS_MODE


@pytest.mark.parametrize("flags", [["--api-server-count", "2"], ["-asc", "4"],
                                   ["--api-server-count=3"]], ids=lambda f: " ".join(f))
def test_api_server_count_above_one_is_refused(flags: list[str]) -> None:
    with pytest.raises(FlagError, match="--api-server-count must be 1"):
        ns(*flags)


def test_api_server_count_one_is_fine() -> None:
    ns("--api-server-count", "1")


def test_no_enable_lora_is_refused() -> None:
    with pytest.raises(FlagError, match="--no-enable-lora is not allowed"):
        ns("--no-enable-lora")


@pytest.mark.parametrize("flags", [["--no-such-flag"], ["--max-num-seqs", "many"],
                                   ["--dtype", "float7"], ["--max-num-seqs"]],
                         ids=lambda f: " ".join(f))
def test_unknown_or_malformed_flag_is_a_flag_error(flags: list[str]) -> None:
    with pytest.raises(FlagError, match="vLLM flags not understood") as e:
        ns(*flags)
    assert " ".join(flags) in str(e.value)


def test_a_positional_model_tag_is_refused_unless_it_is_the_model() -> None:
    """vLLM's parser takes a positional `model_tag` (`vllm serve MODEL`); the engine is
    built from the config's model, so another positional would be silently ignored: it
    is refused, naming it. The model itself given again is fine."""
    with pytest.raises(FlagError, match="unexpected positional argument '/some/other/model'"):
        ns("/some/other/model")
    base = str(tiny_world()["base"].resolve())
    assert ns(base).model == base


# ---------------------------------------------------------------- pass-through


def test_engine_settings_become_flags() -> None:
    args = ns(engine={"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 3,
                      "max_model_len": 200, "max_num_seqs": 5, "dtype": "bfloat16",
                      "kv_cache_memory_bytes": 64 * 1024 * 1024, "enable_prefix_caching": False,
                      "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                      "gpu_memory_utilization": 0.5, "enforce_eager": True, "seed": 11})
    assert (args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (2, 8, 3)
    assert (args.max_model_len, args.max_num_seqs, args.dtype) == (200, 5, "bfloat16")
    assert args.kv_cache_memory_bytes == 64 * 1024 * 1024
    assert args.enable_prefix_caching is False
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (1, 1)
    assert (args.gpu_memory_utilization, args.enforce_eager, args.seed) == (0.5, True, 11)
    assert args.model == str(tiny_world()["base"].resolve())


def test_operator_flags_override_engine_settings() -> None:
    args = ns("--max-num-seqs", "7", "--max-model-len", "300", "--enable-prefix-caching",
              "--seed", "3", engine={"max_num_seqs": 64, "max_model_len": 128,
                                     "enable_prefix_caching": False, "seed": 1})
    assert (args.max_num_seqs, args.max_model_len, args.seed) == (7, 300, 3)
    assert args.enable_prefix_caching is True


def test_plain_vllm_flags_pass_through() -> None:
    args = ns("--max-num-batched-tokens", "512", "--enable-auto-tool-choice",
              "--tool-call-parser", "hermes")
    assert args.max_num_batched_tokens == 512
    assert args.enable_auto_tool_choice is True
    assert args.tool_call_parser == "hermes"


def test_forced_attributes_are_set_whatever_the_flags() -> None:
    args = ns("--enable-lora", "--disable-log-stats", "--served-model-name", "other",
              served_model_name="public-name")
    assert args.enable_lora is True
    assert args.logits_processors == [PROCESSOR_FQCN]
    assert args.logprobs_mode == LOGPROBS_MODE
    assert args.served_model_name == ["public-name"]
    assert args.disable_log_stats is False
    assert args.api_key is None
    plain = ns()
    assert plain.enable_lora is True and plain.logits_processors == [PROCESSOR_FQCN]
    assert plain.served_model_name == [tiny_world()["base"].name]


# ---------------------------------------------------------------- the CLI


def _fail(*_a: Any, **_k: Any) -> None:
    raise AssertionError("the server was started: the flags should have been refused first")


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--api-key", "x"], {}, "--api-key is not allowed"),
    (["--logprobs-mode", "raw_logprobs"], {}, "--logprobs-mode raw_logprobs is not allowed"),
    (["--no-such-flag"], {}, "vLLM flags not understood: --no-such-flag"),
    ([], {"VLLM_SERVER_DEV_MODE": "1"}, "VLLM_SERVER_DEV_MODE is set"),
], ids=["api-key", "logprobs-mode", "unknown", "dev-mode-env"])
def test_cli_refuses_before_loading_anything(argv: list[str], env: dict[str, str],
                                             needle: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from typer.testing import CliRunner

    import unlearnd.serve.app as app_mod
    from unlearnd.cli import app

    monkeypatch.setattr(uvicorn, "run", _fail)
    monkeypatch.setattr(app_mod, "build_app", _fail)
    for var in FORBIDDEN_ENV:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_world()["base"]),
                                      "--state-dir", str(tmp_path / "state"), *argv])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert needle in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()  # the lifespan never ran


def test_cli_subprocess_exits_2_with_the_reason(tmp_path: Path) -> None:
    """The real command line, in its own process: exit 2, the reason on stderr, no
    state directory (created first thing in the lifespan, before the engine)."""
    env = {k: v for k, v in os.environ.items() if k not in FORBIDDEN_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "unlearnd.cli", "serve", "--model", str(tiny_world()["base"]),
         "--api-key", "x"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "error: --api-key is not allowed" in proc.stderr, proc.stderr[-2000:]
    assert FORBIDDEN["api_key"] in proc.stderr
    assert not (tmp_path / "unlearnd-state").exists()
    assert "Uvicorn running" not in proc.stderr and "EngineCore" not in proc.stderr
