"""Server configuration: one pydantic model per component, validated before any model loads.

`unlearnd serve --config FILE.yaml` reads a `ServerConfig`; command-line flags override
the file. Example (see README, "Config as code"):

```yaml
model: ./work/base
state_dir: ./work/state
admin_key_env: UNLEARND_ADMIN_KEY
engine: {max_loras: 4, max_lora_rank: 16, max_model_len: 1024}
tenants:
  - name: acme
    api_key_env: ACME_KEY
    adapter: ./work/adapters/acme-npo
    policy: ./work/policies/acme
  - name: public
    api_key: sk-public-0123456789abcdef
```
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EngineConfig(BaseModel):
    """vLLM engine settings."""

    model_config = ConfigDict(extra="forbid")

    max_loras: int = Field(4, ge=1, description="LoRA adapters resident in one batch.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank accepted.")
    max_cpu_loras: int = Field(16, ge=1, description="Adapters cached in host memory.")
    max_model_len: int = Field(1024, ge=16, description="Context length (prompt + output).")
    max_num_seqs: int = Field(64, ge=1, description="Sequences scheduled per step.")
    dtype: str = Field("float32", description="Model dtype passed to vLLM.")
    kv_cache_memory_bytes: int | None = Field(
        512 * 1024 * 1024, description="KV cache size; None lets vLLM size it from memory.")
    enable_prefix_caching: bool = Field(True, description="Prefix cache (salted per tenant).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = Field(True, description="Skip graph capture (fast start).")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self


class TenantConfig(BaseModel):
    """A tenant declared in the config file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    api_key: str | None = Field(None, description="Literal key (tests, demos).")
    api_key_env: str | None = Field(None, description="Environment variable holding the key.")
    adapter: Path | None = Field(None, description="PEFT LoRA adapter dir to activate.")
    policy: Path | None = Field(None, description="Compiled policy dir to activate.")
    requests_per_s: float | None = Field(None, gt=0, description="This tenant's rate limit.")
    burst: int | None = Field(None, ge=1, description="This tenant's burst size.")
    max_concurrent: int | None = Field(None, ge=1, description="This tenant's concurrency cap.")

    def resolve_key(self) -> str:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(
                    f"tenant {self.name!r}: environment variable {self.api_key_env} is not set")
            return key
        raise ValueError(f"tenant {self.name!r}: needs api_key or api_key_env")


class LimitsConfig(BaseModel):
    """Request limits (4xx beyond them)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(256, ge=1)
    max_tokens: int = Field(4096, ge=1)
    max_n: int = Field(8, ge=1)
    tenant_requests_per_s: float | None = Field(None, gt=0, description="Default per-tenant "
                                                "rate limit (429 + Retry-After past it).")
    tenant_burst: int | None = Field(None, ge=1, description="Default token-bucket size.")
    tenant_max_concurrent: int | None = Field(None, ge=1, description="Default per-tenant "
                                              "cap on requests in flight.")


class ServerConfig(BaseModel):
    """Everything `unlearnd serve` needs."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="Base model directory (HF format).")
    served_model_name: str | None = Field(None, description="Name in /v1/models.")
    state_dir: Path = Field(Path("./unlearnd-state"), description="Registry and store.")
    database_url: str | None = Field(None, description="postgresql://... to share the "
                                     "registry between replicas (the store under state_dir "
                                     "must then be a shared volume); None: SQLite in state_dir.")
    database_url_env: str | None = Field("UNLEARND_DATABASE_URL", description="Environment "
                                         "variable read when database_url is not set.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_key: str | None = None
    admin_key_env: str | None = "UNLEARND_ADMIN_KEY"
    metrics_key: str | None = Field(None, description="When set, /metrics needs "
                                    "`Authorization: Bearer <metrics key>` (it names tenants).")
    metrics_key_env: str | None = "UNLEARND_METRICS_KEY"
    drain_timeout_s: float = Field(60.0, gt=0, description="Max wait before releasing a "
                                   "swapped-out adapter that still has requests.")
    artifact_roots: list[Path] = Field(default_factory=list, description="Admin-registered "
                                       "artifacts must lie under one of these (empty: any).")
    registry_poll_s: float = Field(2.0, gt=0, description="How often a replica checks the "
                                   "registry for swaps made through another replica.")
    registry_notify: bool = Field(True, description="PostgreSQL registry: LISTEN for "
                                  "changes so swaps reach this replica at once (polling "
                                  "stays the fallback). Off behind a pooler that cannot "
                                  "LISTEN, such as PgBouncer in transaction mode.")
    keep_previous_versions: int = Field(1, ge=0, description="Previously active versions "
                                        "per tenant whose adapters stay loaded, so a "
                                        "rollback is a pointer move on every replica.")
    shutdown_grace_s: float = Field(60.0, gt=0, description="On SIGTERM/SIGINT: how long "
                                    "requests in flight may take to finish before they are "
                                    "cut (keep it below the orchestrator's grace period).")
    policy_cache_size: int = Field(256, ge=1, description="Compiled policies each process "
                                   "(API and engine) keeps loaded, least recently used "
                                   "evicted; an evicted one is reloaded on its next request.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    vllm_args: list[str] = Field(default_factory=list, description="`vllm serve` flags "
                                 "for the engine and frontend, after the `engine:` "
                                 "settings (command-line flags are appended to these).")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: Path) -> Path:
        if not (Path(v) / "config.json").is_file():
            raise ValueError(f"model directory {v} has no config.json")
        return Path(v).resolve()

    @model_validator(mode="after")
    def _unique(self) -> ServerConfig:
        names = [t.name for t in self.tenants]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate tenant names: {sorted(dup)}")
        return self

    def resolve_database_url(self) -> str | None:
        if self.database_url:
            return self.database_url
        if self.database_url_env:
            return os.environ.get(self.database_url_env) or None
        return None

    def resolve_metrics_key(self) -> str | None:
        return self.metrics_key or (os.environ.get(self.metrics_key_env) or None
                                    if self.metrics_key_env else None)

    def resolve_admin_key(self) -> str | None:
        if self.admin_key:
            return self.admin_key
        if self.admin_key_env:
            return os.environ.get(self.admin_key_env) or None
        return None

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name

    @classmethod
    def from_yaml(cls, path: Path, **overrides: object) -> ServerConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ValueError(f"config file {path} not found") from e
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        base = Path(path).resolve().parent
        for key in ("model", "state_dir"):
            if key in data and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])
        for t in data.get("tenants") or []:
            for key in ("adapter", "policy"):
                if t.get(key) and not Path(t[key]).is_absolute():
                    t[key] = str(base / t[key])
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
