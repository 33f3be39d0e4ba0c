"""`unlearnd` command line: serve, demo, data, training, policies, evaluation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="unlearnd: inference-time unlearning serving layer for LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="YAML config (see README)."),
    model: Path | None = typer.Option(None, "--model", help="Base model dir (HF format)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Registry directory."),
    host: str | None = typer.Option(None, "--host"),
    port: int | None = typer.Option(None, "--port"),
    admin_key: str | None = typer.Option(None, "--admin-key", envvar="UNLEARND_ADMIN_KEY",
                                         help="Admin API key."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve vLLM's OpenAI API with per-tenant unlearning policies.

    `unlearnd serve [MODEL] [--config FILE] [vllm serve flags]`: every other flag is a
    `vllm serve` flag (`--max-num-batched-tokens 512`, `--enable-auto-tool-choice
    --tool-call-parser hermes`, ...), parsed by vLLM's own parser; flags that would let
    a token escape a policy are refused at start.
    """
    import uvicorn

    from unlearnd.serve.app import build_app
    from unlearnd.serve.config import ServerConfig
    from unlearnd.serve.vllm_args import engine_namespace

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = list(ctx.args)
    model_arg = Path(extra.pop(0)) if extra and not extra[0].startswith("-") else None
    overrides = {"model": model or model_arg, "state_dir": state_dir, "host": host,
                 "port": port, "admin_key": admin_key}
    try:
        if config is not None:
            cfg = ServerConfig.from_yaml(config, **overrides)
        else:
            if overrides["model"] is None:
                raise ValueError("give MODEL, --model DIR or --config FILE.yaml")
            cfg = ServerConfig.model_validate({k: v for k, v in overrides.items()
                                               if v is not None})
        cfg = cfg.model_copy(update={"vllm_args": [*cfg.vllm_args, *extra]})
        engine_namespace(cfg)  # every flag checked before anything loads
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level=log_level,
                timeout_graceful_shutdown=cfg.shutdown_grace_s)


@app.command("tiny-model")
def tiny_model(out: Path = typer.Option(..., "--out"), seed: int = 0) -> None:
    """Write a tiny random Llama (smoke tests; knows nothing)."""
    from unlearnd.toolkit.tiny import make_tiny_model

    make_tiny_model(out, seed=seed)
    typer.echo(str(out))


def _mount() -> None:
    from unlearnd.guards.policy import policy_app
    from unlearnd.toolkit.assistant_train import train_assistant_cmd
    from unlearnd.toolkit.build_base import build_base_cmd
    try:
        from unlearnd.toolkit.demo import demo_cmd
    except ImportError:
        demo_cmd = None
    from unlearnd.toolkit.evaluate import eval_cmd, eval_compare
    from unlearnd.toolkit.synth import data_app
    from unlearnd.toolkit.unlearn import train_adapter_cmd

    app.add_typer(data_app, name="data", help="Synthetic demo data.")
    app.add_typer(policy_app, name="policy", help="Compile unlearning policies.")
    app.command("build-base")(build_base_cmd)
    app.command("train-adapter")(train_adapter_cmd)
    app.command("train-assistant")(train_assistant_cmd)
    app.command("eval")(eval_cmd)
    app.command("eval-compare")(eval_compare)
    if demo_cmd is not None:
        app.command("demo")(demo_cmd)


_mount()

if __name__ == "__main__":
    app()
