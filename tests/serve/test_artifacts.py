"""Adapter / policy validation and content hashing (unlearnd.serve.artifacts)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from unlearnd.serve.artifacts import (
    ADAPTER_WEIGHTS,
    POLICY_FORMAT,
    ArtifactError,
    BaseModelSpec,
    content_hash,
    validate_adapter,
    validate_policy_dir,
)

TARGETS = ("q_proj", "v_proj")


def make_model_and_adapter(
    root: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    rank: int = 4,
    targets: tuple[str, ...] = TARGETS,
) -> tuple[Path, Path]:
    """Save a tiny random Llama's config.json to root/base and a PEFT LoRA for it to
    root/adapter; returns (base_dir, adapter_dir)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        vocab_size=300,
    )
    model = LlamaForCausalLM(cfg)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    )
    # Non-zero B so the weights are not all zero bytes (PEFT initialises B to 0).
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    base_dir, adapter_dir = root / "base", root / "adapter"
    cfg.save_pretrained(base_dir)
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return base_dir, adapter_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifacts")
    base_dir, adapter_dir = make_model_and_adapter(root / "ok")
    _, wide = make_model_and_adapter(root / "wide", hidden=256, heads=4)
    _, deep = make_model_and_adapter(root / "deep", layers=3)
    _, mlp = make_model_and_adapter(root / "mlp", targets=("o_proj", "gate_proj", "down_proj"))
    return {"base": base_dir, "adapter": adapter_dir, "wide": wide, "deep": deep, "mlp": mlp}


@pytest.fixture()
def base(built: dict[str, Path]) -> BaseModelSpec:
    return BaseModelSpec.from_model_dir(built["base"])


@pytest.fixture()
def adapter(built: dict[str, Path], tmp_path: Path) -> Path:
    """A private, mutable copy of the good adapter."""
    dst = tmp_path / "adapter"
    shutil.copytree(built["adapter"], dst)
    return dst


def expect(exc: pytest.ExceptionInfo[ArtifactError], code: str, *fragments: str) -> None:
    err = exc.value
    assert 400 <= err.status < 500, err
    assert err.code == code, err
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))


# -- base model spec ---------------------------------------------------------------


def test_base_spec_from_model_dir(base: BaseModelSpec) -> None:
    assert (base.hidden_size, base.num_layers, base.num_heads, base.head_dim) == (128, 2, 2, 64)
    assert base.num_kv_heads == 2 and base.vocab_size == 300 and base.model_type == "llama"
    assert base.projection_shape("q_proj") == (128, 128)
    assert base.projection_shape("down_proj") == (256, 128)


def test_base_spec_derives_head_dim_and_kv_heads(tmp_path: Path) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 96,
        "intermediate_size": 200,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "vocab_size": 50,
        "head_dim": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = BaseModelSpec.from_model_dir(tmp_path)
    assert spec.head_dim == 96 // 3
    assert spec.num_kv_heads == 3


def test_base_spec_rejects_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as exc:
        BaseModelSpec.from_model_dir(tmp_path)
    expect(exc, "base_model_invalid", "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ArtifactError) as exc:
        BaseModelSpec.from_model_dir(tmp_path)
    expect(exc, "base_model_invalid", "num_attention_heads")
    with pytest.raises(ValueError, match="hidden_size"):
        BaseModelSpec(0, 1, 1, 1, 1, 1, 1, "llama")


# -- adapters ----------------------------------------------------------------------


def test_valid_adapter_accepted(base: BaseModelSpec, adapter: Path) -> None:
    info = validate_adapter(adapter, base, max_lora_rank=8)
    assert info.rank == 4
    assert info.alpha == 8.0
    assert info.target_modules == TARGETS
    assert "adapter_config.json" in info.files and ADAPTER_WEIGHTS in info.files


def test_valid_adapter_on_mlp_and_output_projections(base: BaseModelSpec, built: dict) -> None:
    info = validate_adapter(built["mlp"], base, max_lora_rank=4)
    assert info.target_modules == ("down_proj", "gate_proj", "o_proj")


def test_missing_dir(base: BaseModelSpec, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(tmp_path / "nope", base, 8)
    expect(exc, "adapter_not_found", "nope")


def test_missing_config(base: BaseModelSpec, adapter: Path) -> None:
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_missing_file", "adapter_config.json")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"peft_type": "IA3", "r": 4}', "peft_type"),
        ('{"peft_type": "LORA", "r": "4"}', "r must"),
    ],
)
def test_bad_config(base: BaseModelSpec, adapter: Path, content: str, fragment: str) -> None:
    (adapter / "adapter_config.json").write_text(content)
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_bad_config", "adapter_config.json", fragment)


def test_missing_weights(base: BaseModelSpec, adapter: Path) -> None:
    (adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_missing_file", ADAPTER_WEIGHTS)


def test_bin_weights_rejected(base: BaseModelSpec, adapter: Path) -> None:
    (adapter / ADAPTER_WEIGHTS).rename(adapter / "adapter_model.bin")
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_unsupported_format", "adapter_model.bin", "only adapter_model.safetensors")


def test_truncated_weights(base: BaseModelSpec, adapter: Path) -> None:
    weights = adapter / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_corrupt", ADAPTER_WEIGHTS)


def test_every_truncation_is_refused_cleanly(base: BaseModelSpec, adapter: Path) -> None:
    """Cut the file at many lengths (inside the length prefix, the header and the
    data, and one byte short): always an ArtifactError, never another exception."""
    weights = adapter / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cuts = {0, 3, 8, 9, 8 + header_len // 2, 8 + header_len, 8 + header_len + 1, len(data) - 1}
    cuts |= set(range(8 + header_len, len(data), max(1, (len(data) - header_len) // 7)))
    for cut in sorted(c for c in cuts if c < len(data)):
        weights.write_bytes(data[:cut])
        with pytest.raises(ArtifactError) as exc:
            validate_adapter(adapter, base, 8)
        expect(exc, "adapter_corrupt", ADAPTER_WEIGHTS)
    weights.write_bytes(data + b"\0")  # trailing bytes are a corrupt file too
    with pytest.raises(ArtifactError):
        validate_adapter(adapter, base, 8)


def test_garbage_weights(base: BaseModelSpec, adapter: Path) -> None:
    (adapter / ADAPTER_WEIGHTS).write_bytes(os.urandom(4096))
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_corrupt", ADAPTER_WEIGHTS)


def test_garbage_header_json(base: BaseModelSpec, adapter: Path) -> None:
    header = b"{this is not json}"
    (adapter / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_corrupt", "header is not valid JSON")


@pytest.mark.parametrize(
    ("which", "fragment"), [("wide", "do not fit the base"), ("deep", "layer 2")]
)
def test_wrong_base(base: BaseModelSpec, built: dict, which: str, fragment: str) -> None:
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(built[which], base, 8)
    expect(exc, "adapter_base_mismatch", ADAPTER_WEIGHTS, fragment)


def test_rank_above_max(base: BaseModelSpec, adapter: Path) -> None:
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, max_lora_rank=2)
    expect(exc, "adapter_rank_too_large", "rank 4", "max_lora_rank 2")
    # Tensors with a larger rank than the config claims are caught too.
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 1
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, max_lora_rank=2)
    expect(exc, "adapter_rank_too_large", "rank 4")


def _rewrite_tensors(adapter: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    save_file(edit(dict(tensors)), adapter / ADAPTER_WEIGHTS)


def test_integer_dtype_rejected(base: BaseModelSpec, adapter: Path) -> None:
    _rewrite_tensors(adapter, lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_bad_dtype", "I32")


def test_half_precision_accepted(base: BaseModelSpec, adapter: Path) -> None:
    _rewrite_tensors(adapter, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    assert validate_adapter(adapter, base, 8).rank == 4


def test_missing_lora_b_half(base: BaseModelSpec, adapter: Path) -> None:
    _rewrite_tensors(
        adapter,
        lambda t: {k: v for k, v in t.items() if not ("layers.1" in k and "v_proj.lora_B" in k)},
    )
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_corrupt", "layer 1 v_proj", "lora_B")


def test_unknown_tensor_rejected(base: BaseModelSpec, adapter: Path) -> None:
    _rewrite_tensors(
        adapter, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(300, 128)}
    )
    with pytest.raises(ArtifactError) as exc:
        validate_adapter(adapter, base, 8)
    expect(exc, "adapter_unsupported_module", "lm_head")


def test_max_rank_argument_checked(base: BaseModelSpec, adapter: Path) -> None:
    with pytest.raises(ValueError, match="max_lora_rank"):
        validate_adapter(adapter, base, 0)


# -- policy dirs -------------------------------------------------------------------


def _policy(root: Path, **extra: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "policy.json").write_text(json.dumps({"format": POLICY_FORMAT, **extra}))
    return root


def test_policy_dir_valid(tmp_path: Path) -> None:
    data = validate_policy_dir(_policy(tmp_path / "p", refusal="no"))
    assert data["format"] == POLICY_FORMAT and data["refusal"] == "no"


def test_policy_dir_rejections(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as exc:
        validate_policy_dir(tmp_path / "missing")
    expect(exc, "policy_not_found", "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError) as exc:
        validate_policy_dir(empty)
    expect(exc, "policy_missing_file", "policy.json")
    (empty / "policy.json").write_text("{oops")
    with pytest.raises(ArtifactError) as exc:
        validate_policy_dir(empty)
    expect(exc, "policy_corrupt", "policy.json")
    (empty / "policy.json").write_text(json.dumps({"format": "something/2"}))
    with pytest.raises(ArtifactError) as exc:
        validate_policy_dir(empty)
    expect(exc, "policy_bad_format", "something/2")


# -- content hash ------------------------------------------------------------------


def test_hash_deterministic_and_location_independent(adapter: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "x" / "y" / "copy"
    shutil.copytree(adapter, elsewhere)
    os.utime(elsewhere / ADAPTER_WEIGHTS, (0, 0))  # timestamps must not count
    first = content_hash([adapter])
    assert first == content_hash([adapter])
    assert first == content_hash([elsewhere])
    assert len(first) == 64 and int(first, 16) >= 0


def test_hash_changes_on_one_byte(adapter: Path) -> None:
    before = content_hash([adapter])
    weights = adapter / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert content_hash([adapter]) != before


def test_hash_sees_names_boundaries_and_labels(tmp_path: Path) -> None:
    a = _policy(tmp_path / "a")
    (a / "extra.bin").write_bytes(b"abc")
    h = content_hash([a])
    (a / "extra.bin").rename(a / "other.bin")
    assert content_hash([a]) != h
    (a / "other.bin").rename(a / "extra.bin")
    assert content_hash([a]) == h
    # Moving a byte from one file to the next must change the hash.
    (a / "extra.bin").write_bytes(b"ab")
    (a / "policy.json").write_bytes((a / "policy.json").read_bytes() + b"c")
    assert content_hash([a]) != h
    b = _policy(tmp_path / "b")
    assert content_hash([b], labels=["adapter"]) != content_hash([b], labels=["policy"])
    assert content_hash([a, b]) != content_hash([b, a])
    with pytest.raises(ValueError):
        content_hash([a], labels=["x", "y"])


def test_hash_separates_names_from_contents(tmp_path: Path) -> None:
    """File "a" holding "bX" and file "ab" holding "X" feed the same bytes unless
    names and contents are delimited."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a").write_bytes(b"bX")
    (two / "ab").write_bytes(b"X")
    assert content_hash([one]) != content_hash([two])


def test_every_rejection_code_is_listed_for_the_metrics() -> None:
    """Each code an ArtifactError can carry is in REJECTION_CODES, so the metrics module
    pre-creates its series at zero (a series born at 1 is invisible to increase())."""
    import re

    from prometheus_client import CollectorRegistry

    import unlearnd.serve.artifacts as artifacts
    from unlearnd.serve.artifacts import REJECTION_CODES
    from unlearnd.serve.metrics import UnlearndMetrics

    source = Path(artifacts.__file__).read_text()
    used = set(re.findall(r'"((?:adapter|policy)_[a-z_]+|base_model_invalid)"', source))
    assert used == set(REJECTION_CODES)
    m = UnlearndMetrics(registry=CollectorRegistry())
    m.init_tenant("acme")
    for code in (*REJECTION_CODES, "load_failed"):
        assert m.registry.get_sample_value("unlearnd_adapter_rejections_total",
                                           {"tenant": "acme", "reason": code}) == 0
    assert m.registry.get_sample_value("unlearnd_policy_swaps_total",
                                       {"tenant": "acme", "kind": "sync"}) == 0
