"""Validation and content hashing of the artifacts a policy version bundles.

A policy version may carry a PEFT LoRA adapter (served by vLLM multi-LoRA) and a
compiled policy directory (read by the guards). Both arrive from operators through
the admin API, so nothing in them is trusted: this module checks them before the
registry stores them, and names the file and the problem when it refuses one.

Only the safetensors header is parsed here (no tensor is loaded), so validating an
adapter of a few hundred MB costs a few ms of I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
POLICY_FILE = "policy.json"
POLICY_FORMAT = "unlearnd.policy/1"

# safetensors dtypes vLLM can load LoRA weights from (it casts to the model dtype).
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# A safetensors header is a JSON object; real LoRA headers are a few hundred KB at
# most. The cap stops a forged 8-byte length from making us allocate gigabytes.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASH_CHUNK = 1 << 20

# PEFT key for a Llama LoRA weight, e.g.
# base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
# (an adapter name may sit between lora_A and weight in some PEFT versions).
_LORA_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
    r"(?P<module>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
    r"lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_MODULE_BLOCK = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


REJECTION_CODES = (
    "adapter_bad_config",
    "adapter_bad_dtype",
    "adapter_base_mismatch",
    "adapter_corrupt",
    "adapter_empty",
    "adapter_missing_file",
    "adapter_not_found",
    "adapter_rank_too_large",
    "adapter_unsupported_format",
    "adapter_unsupported_module",
    "base_model_invalid",
    "policy_bad_format",
    "policy_corrupt",
    "policy_missing_file",
    "policy_not_found",
)
"""Every `ArtifactError.code` (the admin API's 4xx codes for a refused artifact); the
metrics pre-create a rejection series for each, so the first one is seen as a rise."""


class ArtifactError(Exception):
    """An artifact (adapter or compiled policy) was refused.

    `status` is the HTTP status the admin API answers with (4xx: the caller sent
    something wrong), `code` a short machine-readable reason such as
    ``"adapter_missing_file"``; ``str(e)`` names the problem and the file.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def __repr__(self) -> str:
        return f"ArtifactError({self.status}, {self.code!r}, {str(self)!r})"


@dataclass(frozen=True)
class BaseModelSpec:
    """The shapes of the served base model that a LoRA adapter must fit.

    Llama-style decoder: `num_heads * head_dim` is the q/o projection width,
    `num_kv_heads * head_dim` the k/v width (grouped-query attention when smaller).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    model_type: str

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BaseModelSpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"BaseModelSpec.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if not isinstance(self.model_type, str):
            raise ValueError(f"BaseModelSpec.model_type must be a str, got {self.model_type!r}")

    @classmethod
    def from_model_dir(cls, path: Path | str) -> BaseModelSpec:
        """Read an HF model dir's `config.json` (Llama-style keys).

        `head_dim` defaults to `hidden_size // num_attention_heads` when the config
        has none (or null); `num_key_value_heads` defaults to the head count.
        Raises ArtifactError (400, "base_model_invalid") when the file is missing,
        not JSON, or lacks a required key.
        """
        config_path = Path(path) / "config.json"
        config = _read_json_object(config_path, 400, "base_model_invalid", "base model config")
        # Multimodal wrappers keep the language model's numbers under text_config.
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], "model_type": config.get("model_type", "")}

        def need(key: str) -> Any:
            if key not in config or config[key] is None:
                raise ArtifactError(
                    400, "base_model_invalid", f"{config_path}: missing key {key!r}"
                )
            return config[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = config.get("head_dim")
        if head_dim is None:
            if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
                raise ArtifactError(
                    400,
                    "base_model_invalid",
                    f"{config_path}: cannot derive head_dim from hidden_size={hidden!r}, "
                    f"num_attention_heads={heads!r}",
                )
            head_dim = hidden // heads
        kv_heads = config.get("num_key_value_heads")
        if kv_heads is None:
            kv_heads = heads
        try:
            return cls(
                hidden_size=hidden,
                intermediate_size=need("intermediate_size"),
                num_layers=need("num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                vocab_size=need("vocab_size"),
                model_type=str(config.get("model_type", "")),
            )
        except ValueError as exc:
            raise ArtifactError(400, "base_model_invalid", f"{config_path}: {exc}") from exc

    def projection_shape(self, module: str) -> tuple[int, int]:
        """`(in_features, out_features)` of a Llama projection `module` (q_proj, ...)."""
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_width),
            "k_proj": (self.hidden_size, kv_width),
            "v_proj": (self.hidden_size, kv_width),
            "o_proj": (q_width, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise ValueError(f"unknown projection module {module!r}")
        return shapes[module]


@dataclass(frozen=True)
class AdapterInfo:
    """What a validated LoRA adapter is.

    `rank` is the largest LoRA rank in it (config `r`, or the largest `rank_pattern`
    entry), `alpha` the config's `lora_alpha`, `target_modules` the projections that
    carry weights in the file (sorted), `base_model` the config's
    `base_model_name_or_path` (informational only: the shapes decide), `files` the
    file names in the adapter dir (sorted).
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    files: tuple[str, ...]


def _read_json_object(path: Path, status: int, code: str, what: str) -> dict[str, Any]:
    """Parse `path` as a JSON object or raise ArtifactError naming the file."""
    if not path.is_file():
        raise ArtifactError(status, code, f"{what} file {path} is missing")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(status, code, f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(
            status, code, f"{what} file {path} must hold a JSON object, not {type(data).__name__}"
        )
    return data


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors file's header without loading any tensor.

    Returns `{tensor_name: {"dtype": str, "shape": list[int], "data_offsets": [a, b]}}`
    (the `__metadata__` entry removed). Checks what the safetensors format requires:
    header length within the file, a JSON object, every tensor's byte range inside
    the data section and matching dtype x shape, ranges covering the data section
    exactly. Raises ArtifactError (422, "adapter_corrupt") naming the file otherwise.
    """

    def corrupt(reason: str) -> ArtifactError:
        return ArtifactError(
            422, "adapter_corrupt", f"adapter weights {path} are corrupt: {reason}"
        )

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt(f"file is {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len == 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise corrupt(
                    f"header length {header_len} does not fit a file of {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise ArtifactError(
            422, "adapter_corrupt", f"cannot read adapter weights {path}: {exc}"
        ) from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    ranges: list[tuple[int, int]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise corrupt(f"tensor {name!r} has no entry object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise corrupt(f"tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise corrupt(
                f"tensor {name!r} data offsets {offsets!r} fall outside the {data_len}-byte "
                "data section (truncated file?)"
            )
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
            raise corrupt(
                f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} "
                f"needs {numel * _DTYPE_BYTES[dtype]}"
            )
        ranges.append((offsets[0], offsets[1]))
    ranges.sort()
    cursor = 0
    for start, end in ranges:
        if start != cursor:
            raise corrupt("tensor data ranges overlap or leave gaps")
        cursor = end
    if cursor != data_len:
        raise corrupt(
            f"tensors cover {cursor} bytes but the data section has {data_len} "
            "(truncated or padded file)"
        )
    return header


def _check_with_safetensors(path: Path) -> None:
    """Second opinion from the safetensors library itself (mmap, header only)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return
    try:
        with safe_open(str(path), framework="numpy") as fh:
            list(fh.keys())
    except Exception as exc:  # the library raises its own SafetensorError and others
        raise ArtifactError(
            422, "adapter_corrupt", f"adapter weights {path} are corrupt: safetensors says {exc}"
        ) from exc


def validate_adapter(adapter_dir: Path, base: BaseModelSpec, max_lora_rank: int) -> AdapterInfo:
    """Check a PEFT LoRA adapter dir against the base model and the rank limit.

    Needs `adapter_config.json` (a JSON object with `peft_type` "LORA" and an int
    `r`) and `adapter_model.safetensors` (a `.bin` is refused: only safetensors is
    accepted, a pickle can run code). Every `lora_A` tensor must be `[r, in_features]`
    and every `lora_B` `[out_features, r]` of a q/k/v/o/gate/up/down projection of
    the base, at a layer index below `base.num_layers`, in a float dtype; every
    module needs both halves. Returns what the adapter is; raises ArtifactError
    (4xx, code, message naming the file and the problem) otherwise.
    """
    if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank <= 0:
        raise ValueError(f"max_lora_rank must be a positive int, got {max_lora_rank!r}")
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ArtifactError(400, "adapter_not_found", f"adapter dir {adapter_dir} does not exist")
    files = tuple(sorted(p.name for p in adapter_dir.iterdir()))
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ArtifactError(
            422, "adapter_missing_file", f"adapter dir {adapter_dir} has no {ADAPTER_CONFIG}"
        )
    config = _read_json_object(config_path, 422, "adapter_bad_config", "adapter config")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ArtifactError(
            422,
            "adapter_bad_config",
            f'{config_path}: peft_type must be "LORA", got {peft_type!r}',
        )
    if config.get("use_dora"):
        raise ArtifactError(
            422, "adapter_bad_config", f"{config_path}: DoRA adapters (use_dora) are not supported"
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ArtifactError(
            422, "adapter_bad_config", f"{config_path}: r must be a positive int, got {rank!r}"
        )
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rank_pattern.values()
    ):
        raise ArtifactError(
            422,
            "adapter_bad_config",
            f"{config_path}: rank_pattern must map names to positive ints, got {rank_pattern!r}",
        )
    max_rank = max([rank, *rank_pattern.values()])
    if max_rank > max_lora_rank:
        raise ArtifactError(
            422,
            "adapter_rank_too_large",
            f"{config_path}: LoRA rank {max_rank} exceeds the server's "
            f"max_lora_rank {max_lora_rank}",
        )
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ArtifactError(
            422, "adapter_bad_config", f"{config_path}: lora_alpha must be a number, got {alpha!r}"
        )
    base_model = config.get("base_model_name_or_path")
    base_model = base_model if isinstance(base_model, str) else None

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise ArtifactError(
                422,
                "adapter_unsupported_format",
                f"adapter dir {adapter_dir} has adapter_model.bin: only {ADAPTER_WEIGHTS} is "
                "accepted (re-save with save_pretrained(..., safe_serialization=True))",
            )
        raise ArtifactError(
            422, "adapter_missing_file", f"adapter dir {adapter_dir} has no {ADAPTER_WEIGHTS}"
        )
    header = read_safetensors_header(weights)
    _check_with_safetensors(weights)
    if not header:
        raise ArtifactError(422, "adapter_empty", f"adapter weights {weights} hold no tensors")

    # (layer, module) -> {"A": shape, "B": shape}
    halves: dict[tuple[int, str], dict[str, list[int]]] = {}
    for name, entry in header.items():
        match = _LORA_KEY.search(name)
        if match is None:
            raise ArtifactError(
                422,
                "adapter_unsupported_module",
                f"adapter weights {weights}: tensor {name!r} is not a LoRA weight of a "
                "q/k/v/o/gate/up/down projection of a Llama-style model",
            )
        module = match["module"]
        if match["block"] != _MODULE_BLOCK[module]:
            raise ArtifactError(
                422,
                "adapter_base_mismatch",
                f"adapter weights {weights}: tensor {name!r} puts {module} under {match['block']}",
            )
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise ArtifactError(
                422,
                "adapter_bad_dtype",
                f"adapter weights {weights}: tensor {name!r} has dtype {entry['dtype']}, "
                f"expected one of {sorted(_FLOAT_DTYPES)}",
            )
        layer = int(match["layer"])
        if layer >= base.num_layers:
            raise ArtifactError(
                422,
                "adapter_base_mismatch",
                f"adapter weights {weights}: tensor {name!r} targets layer {layer} but the base "
                f"model has {base.num_layers} layers (adapter made for another base model?)",
            )
        slot = halves.setdefault((layer, module), {})
        if match["ab"] in slot:
            raise ArtifactError(
                422,
                "adapter_corrupt",
                f"adapter weights {weights}: two lora_{match['ab']} tensors for "
                f"layer {layer} {module}",
            )
        slot[match["ab"]] = entry["shape"]

    for (layer, module), slot in sorted(halves.items()):
        in_features, out_features = base.projection_shape(module)
        where = f"adapter weights {weights}: layer {layer} {module}"
        if set(slot) != {"A", "B"}:
            missing = "lora_B" if "A" in slot else "lora_A"
            raise ArtifactError(422, "adapter_corrupt", f"{where} has no {missing} tensor")
        shape_a, shape_b = slot["A"], slot["B"]
        if len(shape_a) != 2 or len(shape_b) != 2:
            raise ArtifactError(
                422,
                "adapter_base_mismatch",
                f"{where}: lora_A {shape_a} / lora_B {shape_b} are not matrices",
            )
        r_a, r_b = shape_a[0], shape_b[1]
        if r_a != r_b or r_a <= 0:
            raise ArtifactError(
                422,
                "adapter_corrupt",
                f"{where}: lora_A rank {r_a} and lora_B rank {r_b} differ",
            )
        if r_a > max_lora_rank:
            raise ArtifactError(
                422,
                "adapter_rank_too_large",
                f"{where}: LoRA rank {r_a} exceeds the server's max_lora_rank {max_lora_rank}",
            )
        if not rank_pattern and r_a != rank:
            raise ArtifactError(
                422,
                "adapter_corrupt",
                f"{where}: tensors have rank {r_a} but {ADAPTER_CONFIG} says r={rank}",
            )
        if shape_a[1] != in_features or shape_b[0] != out_features:
            raise ArtifactError(
                422,
                "adapter_base_mismatch",
                f"{where}: lora_A {shape_a} / lora_B {shape_b} do not fit the base model "
                f"(expected [r, {in_features}] / [{out_features}, r]; adapter made for "
                "another base model?)",
            )

    target_modules = tuple(sorted({module for _, module in halves}))
    logger.info(
        "adapter %s valid: rank %d, alpha %s, modules %s, %d tensors",
        adapter_dir,
        max_rank,
        alpha,
        ",".join(target_modules),
        len(header),
    )
    return AdapterInfo(
        rank=max_rank,
        alpha=float(alpha),
        target_modules=target_modules,
        base_model=base_model,
        files=files,
    )


def validate_policy_dir(policy_dir: Path) -> dict:
    """Check a compiled policy dir and return its parsed `policy.json`.

    The dir needs `policy.json` holding a JSON object whose `"format"` is
    ``"unlearnd.policy/1"``. Other files (embeddings, assistant model) are not
    inspected here; they are part of the content hash. Raises ArtifactError otherwise.
    """
    policy_dir = Path(policy_dir)
    if not policy_dir.is_dir():
        raise ArtifactError(400, "policy_not_found", f"policy dir {policy_dir} does not exist")
    path = policy_dir / POLICY_FILE
    if not path.is_file():
        raise ArtifactError(
            422, "policy_missing_file", f"policy dir {policy_dir} has no {POLICY_FILE}"
        )
    data = _read_json_object(path, 422, "policy_corrupt", "policy")
    if data.get("format") != POLICY_FORMAT:
        raise ArtifactError(
            422,
            "policy_bad_format",
            f'{path}: "format" must be {POLICY_FORMAT!r}, got {data.get("format")!r}',
        )
    return data


def _files_under(root: Path) -> list[tuple[str, Path]]:
    """`(relative posix path, path)` of every regular file under `root`, sorted."""
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in filenames:
            full = Path(dirpath) / fname
            if full.is_file():
                out.append((full.relative_to(root).as_posix(), full))
    out.sort(key=lambda item: item[0].encode("utf-8"))
    return out


def content_hash(paths: Sequence[Path], *, labels: Sequence[str] | None = None) -> str:
    """Hex sha256 of the files under `paths`, stable across machines.

    Each root contributes its label (default: its position, "0", "1", ...), then for
    every file, in byte order of its relative POSIX path: the path, the size and the
    bytes, each length-prefixed so no two different trees can feed the same stream.
    Absolute paths, timestamps and permissions do not count. The registry passes
    labels ("adapter", "policy") so an adapter and a policy with the same bytes
    differ.
    """
    roots = [Path(p) for p in paths]
    if labels is None:
        labels = [str(i) for i in range(len(roots))]
    if len(labels) != len(roots):
        raise ValueError(f"got {len(labels)} labels for {len(roots)} paths")
    digest = hashlib.sha256(b"unlearnd.content/1\0")

    def put(data: bytes) -> None:
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)

    for label, root in zip(labels, roots, strict=True):
        files = _files_under(root)
        put(b"root")
        put(label.encode("utf-8"))
        digest.update(struct.pack("<Q", len(files)))
        for rel, full in files:
            put(rel.encode("utf-8"))
            with full.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                digest.update(struct.pack("<Q", size))
                seen = 0
                while chunk := fh.read(_HASH_CHUNK):
                    digest.update(chunk)
                    seen += len(chunk)
            if seen != size:
                raise OSError(f"{full} changed size while being hashed ({size} -> {seen})")
    return digest.hexdigest()
