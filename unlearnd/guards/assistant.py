"""The contrastive assistant runner: next-token logits of a small assistant LM, per request.

ULD (arXiv 2406.08607) decodes with ``z = z_base - w * z_assist``: every step of every
guarded request needs the assistant's next-token logits for the same token sequence the
base model sees. vLLM runs the base model; this module runs the assistant beside it, in
the engine process, from plain token ids (the assistant shares the base's tokenizer, so
no tokenizer is loaded here).

The runner keeps one KV cache per request key. The first call for a key prefills the
whole sequence; later calls feed only the tokens appended since the previous call
(normally one) and all such rows go through ONE batched forward pass: the per-request
caches are left-padded to a common length, an attention mask hides the padding and
``position_ids`` carry each row's true positions, so a row's logits do not depend on
which other rows share its batch. A sequence that no longer extends what was cached
(a preempted and recomputed request, a reused key) is prefilled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["AssistantRunner", "get_runner", "load_causal_lm", "build_assistant",
           "ASSISTANT_FILE", "is_shared_base_assistant"]

ASSISTANT_FILE = "assistant.json"
"""Marks an assistant saved as a LoRA over the base's first K layers (``"layers": K``,
``"base": <base model dir>``): such assistants share one copy of those layers per
process, and each adds only its LoRA (see :func:`get_runner`)."""
ASSISTANT_FORMAT = "unlearnd.assistant/1"
REPORT_FILE = "assistant_report.json"
"""What ``train-assistant`` measured (``after.sure``: how sure it is of the forget facts
and of retain text at each probability); policy compile records it
(:func:`unlearnd.guards.policy.assistant_calibration`)."""


def build_assistant(base: torch.nn.Module, layers: int, init: str = "base") -> torch.nn.Module:
    """A copy of `base` truncated to its first `layers` decoder layers.

    Embeddings, the first `layers` decoder layers, the final norm and the LM head are
    copied from `base`; the config is the base's with ``num_hidden_layers=layers`` and
    untied embeddings (the head is a separate copy even when the base ties them).
    ``init="scratch"``: only the embeddings and the LM head are copied; the decoder
    layers and the final norm keep the config's random initialisation, so the model
    knows nothing the base's layers learnt (see :func:`train_assistant`'s ``init``).
    """
    import copy
    import re

    from transformers import AutoModelForCausalLM

    if init not in ASSISTANT_INITS:
        raise ValueError(f"init must be one of {', '.join(ASSISTANT_INITS)}, got {init!r}")
    n = int(base.config.num_hidden_layers)
    if not 1 <= layers <= n:
        raise ValueError(f"layers must be in [1, {n}] for this base, got {layers}")
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = layers
    # untied: the LoRA on lm_head, once merged, must not change the input embeddings
    config.tie_word_embeddings = False
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    assistant = AutoModelForCausalLM.from_config(config, dtype=base.dtype)
    keep = {}
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    for name, tensor in base.state_dict().items():
        if init == "scratch" and not name.endswith(LEXICAL_SUFFIXES):
            continue
        m = pattern.search(name)
        if m is None or int(m.group(1)) < layers:
            keep[name] = tensor.detach().clone()
    if init == "scratch" and "lm_head.weight" not in keep:
        # a tied base keeps its head in the embeddings
        emb = next(k for k in keep if k.endswith("embed_tokens.weight"))
        keep["lm_head.weight"] = keep[emb].clone()
    assistant.load_state_dict(keep, strict=init == "base")
    return assistant


ASSISTANT_INITS = ("base", "scratch")
"""How :func:`build_assistant` starts the assistant: the base's first layers, or random
layers over the base's embeddings and head."""

LEXICAL_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
"""What ``init="scratch"`` keeps of the base: its token embeddings and output head."""


def is_shared_base_assistant(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ASSISTANT_FILE).is_file()


def _shared_base_spec(model_dir: Path) -> tuple[Path, int]:
    """(base model dir, K) of a LoRA-over-K-layers assistant; ValueError naming the problem."""
    path = model_dir / ASSISTANT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from exc
    if doc.get("format") != ASSISTANT_FORMAT:
        raise ValueError(f"{path}: format {doc.get('format')!r}, expected {ASSISTANT_FORMAT!r}")
    layers = doc.get("layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{path}: layers must be an int >= 1, got {layers!r}")
    base = Path(str(doc.get("base") or ""))
    if not (base / "config.json").is_file():
        raise ValueError(f"{path}: base model dir {str(base)!r} has no config.json")
    if not (model_dir / "adapter_config.json").is_file():
        raise ValueError(f"{model_dir} has {ASSISTANT_FILE} but no adapter_config.json")
    return base.resolve(), layers


class _SharedBase:
    """The base's first K layers, loaded once per process, with tenants' LoRAs attached
    by name (peft, unmerged): each forward names the adapter its rows use."""

    def __init__(self, base_dir: Path, layers: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        self.model: Any = build_assistant(full, layers)
        del full
        self.model.to(device)
        self.model.eval()
        self.adapters: dict[str, str] = {}  # adapter name -> dir it came from
        self.lock = threading.RLock()
        logger.info("shared assistant base: first %d layers of %s on %s", layers, base_dir,
                    device)

    def attach(self, adapter_dir: Path) -> str:
        """Load the LoRA in `adapter_dir` (named by its content) unless already loaded."""
        from peft import PeftModel

        name = "a" + assistant_digest(adapter_dir)[:16]
        with self.lock:
            if name in self.adapters:
                return name
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir),
                                                       adapter_name=name)
            else:
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            self.model.eval()
            self.adapters[name] = str(adapter_dir)
        return name


_SHARED: dict[tuple[str, int, str, str], _SharedBase] = {}


def _resolve_adapter(model_dir: Path) -> tuple[Path, Path | None]:
    """Return ``(base_dir, adapter_dir or None)`` for an assistant directory.

    Layouts understood:

    - a full HF model dir (``config.json`` + weights): no adapter;
    - a full model dir with an ``adapter/`` subdir holding a PEFT LoRA: base = the dir;
    - a PEFT adapter dir (``adapter_config.json``): base = the dir itself when it also
      has ``config.json``, else the adapter config's ``base_model_name_or_path``
      (a relative path is taken relative to the adapter dir).
    """
    if (model_dir / "adapter_config.json").is_file():
        adapter_dir = model_dir
    elif (model_dir / "adapter" / "adapter_config.json").is_file():
        adapter_dir = model_dir / "adapter"
    else:
        return model_dir, None
    if (model_dir / "config.json").is_file():
        return model_dir, adapter_dir
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"adapter dir {adapter_dir} has no base_model_name_or_path and {model_dir} "
            "has no config.json"
        )
    base_path = Path(base)
    if not base_path.is_absolute() and (adapter_dir / base_path).exists():
        base_path = adapter_dir / base_path
    if not (base_path / "config.json").is_file():
        raise ValueError(f"base model dir {base_path!s} (from {adapter_dir}) has no config.json")
    return base_path, adapter_dir


def load_causal_lm(model_dir: str | Path, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load an HF causal LM, merging a PEFT LoRA adapter into it when the dir has one.

    Returns the model in eval mode on `device` with `dtype` weights.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model_dir {str(model_dir)!r} is not a directory")
    base_dir, adapter_dir = _resolve_adapter(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        logger.info("merging LoRA adapter %s into %s", adapter_dir, base_dir)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.to(device)
    model.eval()
    return model


_LEXICAL: dict[tuple, Any] = {}  # file fingerprint -> weakref to the weight loaded from it
_LEXICAL_LOCK = threading.Lock()


def _matches(stored: str, name: str) -> bool:
    """A parameter's name and a stored tensor's, up to a leading module prefix."""
    return stored == name or stored.endswith("." + name) or name.endswith("." + stored)


def _safetensors_fingerprints(model_dir: Path, names: set[str]) -> dict[str, tuple]:
    """``{tensor name: (dtype, shape, sha256 of its bytes)}`` for the tensors in the model
    dir's ``*.safetensors`` files that match one of ``names``, read with plain reads: a
    model loaded from them memory-maps the same files, and reading its tensors would
    fault their pages into this process."""
    out: dict[str, tuple] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            for name, meta in header.items():
                if name == "__metadata__" or not any(_matches(name, n) for n in names):
                    continue
                start, end = meta["data_offsets"]
                fh.seek(8 + size + start)
                h, left = hashlib.sha256(), end - start
                while left > 0:
                    chunk = fh.read(min(left, 1 << 24))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
                out[name] = (meta["dtype"], tuple(meta["shape"]), h.hexdigest())
    return out


def share_lexical_weights(model: torch.nn.Module, model_dir: str | Path) -> int:
    """Point ``model``'s input embeddings and LM head (loaded from ``model_dir`` as a
    plain model, no adapter merged) at the tensor another assistant in this process
    loaded from the same bytes, where there is one; returns how many of the two it
    shared.

    A scratch assistant copies the base's embeddings and head and never trains them
    (``train-assistant --init scratch``), so every scratch assistant on one base holds
    the same 2 x vocabulary x hidden weights; with this the process keeps one copy
    however many tenants' assistants it loads. Weights are matched by the sha256 of
    their bytes in the files (and the dtype and device they were loaded to), so a
    trained head (a merged base-layer assistant's) keeps its own; the files are read,
    not the loaded tensors, so the copy not kept is never paged in. Inference only:
    the weights are never written."""
    names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
    modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings())
               if id(getattr(m, "weight", None)) in names]
    if not modules:
        return 0
    prints = _safetensors_fingerprints(Path(model_dir), {names[id(m.weight)] for m in modules})
    shared = 0
    with _LEXICAL_LOCK:
        for key in [k for k, ref in _LEXICAL.items() if ref() is None]:
            del _LEXICAL[key]
        for module in modules:
            weight, name = module.weight, names[id(module.weight)]
            found = next((v for k, v in prints.items() if _matches(k, name)), None)
            if found is None or tuple(weight.shape) != found[1]:
                continue
            key = (*found, str(weight.dtype), str(weight.device))
            kept = _LEXICAL.get(key)
            same = kept() if kept is not None else None
            if same is None:
                _LEXICAL[key] = weakref.ref(weight)
            elif same is not weight:
                module.weight = same
                shared += 1
    return shared


@dataclass
class _CachedRequest:
    """One request's assistant state: tokens seen, per-layer KV and last logits.

    `keys[l]`/`values[l]` are `[heads, len(tokens), head_dim]`; `logits` is `[V]` fp32,
    the next-token logits after `tokens`.
    """

    tokens: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor


class AssistantRunner:
    """Runs the ULD assistant model for many concurrent requests with per-request KV caches.

    Args:
        model_dir: HF causal LM directory (e.g. a compiled policy's ``assistant/``),
            optionally a PEFT LoRA adapter (see :func:`load_causal_lm`).
        device: torch device for the model and caches.
        dtype: weight and cache dtype; returned logits are always fp32.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, *, shallow: bool = False) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {device!r} is not a torch device") from exc
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self._adapter: str | None = None   # the LoRA this runner's rows use (shared base)
        self._shared: _SharedBase | None = None
        if is_shared_base_assistant(self.model_dir):
            base_dir, layers = _shared_base_spec(self.model_dir)
            key = (str(base_dir), layers, str(self.device), str(dtype))
            with _SHARED_LOCK:
                shared = _SHARED.get(key)
                if shared is None:
                    shared = _SHARED[key] = _SharedBase(base_dir, layers, self.device, dtype)
            self._shared = shared
            # shallow: the same layers with no LoRA (peft's "__base__" rows)
            self._adapter = "__base__" if shallow else shared.attach(self.model_dir)
            self.model = shared.model
        elif shallow:
            raise ValueError(f"{self.model_dir} is a full assistant model, not a LoRA over "
                             "the base's first layers: it has no shallow copy to compare to")
        else:
            self.model = load_causal_lm(self.model_dir, self.device, dtype)
            if _resolve_adapter(self.model_dir)[1] is None:  # nothing merged into it
                share_lexical_weights(self.model, self.model_dir)
        self.vocab_size: int = int(self.model.get_output_embeddings().weight.shape[0]) \
            if self._shared is None else int(self.model.config.vocab_size)
        self._cache: dict[Hashable, _CachedRequest] = {}
        self._lock = threading.RLock()
        self.is_shallow = shallow
        self._shallow: AssistantRunner | None = None
        logger.info("assistant runner: %s on %s (%s), vocab %d, %d layers", self.model_dir,
                    self.device, dtype, self.vocab_size, self.model.config.num_hidden_layers)

    # ------------------------------------------------------------------ public API
    def logits(self, reqs: Sequence[tuple[Hashable, Sequence[int]]]) -> torch.Tensor:
        """Next-token logits of the assistant for each request.

        Args:
            reqs: ``(key, token_ids)`` per row; ``token_ids`` is the request's full
                sequence so far (prompt + output so far). Keys must be distinct.

        Returns:
            `[len(reqs), vocab_size]` fp32 tensor on the runner's device; row ``i`` is
            the logits for the token after ``reqs[i][1]``.
        """
        keys = [k for k, _ in reqs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate request keys in one call: {keys!r}")
        out = torch.empty((len(reqs), self.vocab_size), dtype=torch.float32, device=self.device)
        if not reqs:
            return out
        with self._lock, torch.inference_mode():
            extend: list[tuple[int, Hashable, tuple[int, ...]]] = []
            for row, (key, seq) in enumerate(reqs):
                tokens = tuple(int(t) for t in seq)
                if not tokens:
                    raise ValueError(f"request {key!r} has an empty token sequence")
                state = self._cache.get(key)
                if state is not None and len(tokens) >= len(state.tokens) \
                        and tokens[: len(state.tokens)] == state.tokens:
                    if len(tokens) == len(state.tokens):
                        out[row] = state.logits
                    else:
                        extend.append((row, key, tokens))
                    continue
                if state is not None:
                    logger.debug("assistant: %r no longer extends its cache; re-prefilling", key)
                self._cache[key] = self._prefill(tokens)
                out[row] = self._cache[key].logits
            if extend:
                self._extend_batch(extend, out)
        return out

    def rollout(self, key: Hashable, seq: Sequence[int], first: int, steps: int,
                min_logp: float, gain_gate: float | None = None) -> list[int]:
        """The assistant's own greedy continuation of ``seq + [first]`` while it stays
        sure: up to ``steps`` tokens, each the argmax of a distribution whose top
        log-probability is ``>= min_logp``. ``key``'s cache is read, never changed (the
        continuation runs on a copy that is dropped after).

        Where the assistant is sure of a token it is at a forget fact; the rest of the
        fact is what it would say next (" Cobalt" -> " Laurel" -> " Prize").
        `gain_gate` (``contrastive_gain_gate``): the continuation also stops at the
        first token its LoRA raised by less than that many nats over its base layers
        (:meth:`shallow`): past the fact, the name any text would complete.
        """
        out: list[int] = []
        if steps <= 0:
            return out
        tmp = ("rollout", key)
        tokens = tuple(int(t) for t in seq)
        twin = self.shallow() if gain_gate is not None else None
        runners = [self] if twin is None else [self, twin]
        with self._lock:
            for r in runners:
                state = r._cache.get(key)
                if state is not None and state.tokens == tokens[: len(state.tokens)]:
                    # tensors are never written in place (extensions concatenate): share
                    r._cache[tmp] = _CachedRequest(state.tokens, list(state.keys),
                                                   list(state.values), state.logits)
            try:
                cur = [*tokens, int(first)]
                for _ in range(steps):
                    logp = torch.log_softmax(self.logits([(tmp, cur)])[0], dim=-1)
                    top, tok = torch.max(logp, dim=-1)
                    if float(top) < min_logp:
                        break
                    if twin is not None:
                        base = torch.log_softmax(twin.logits([(tmp, cur)])[0], dim=-1)
                        if float(top) - float(base[int(tok)]) < gain_gate:
                            break
                    out.append(int(tok))
                    cur.append(int(tok))
            finally:
                for r in runners:
                    r._cache.pop(tmp, None)
        return out

    def shallow(self) -> AssistantRunner:
        """The runner of the base's first K layers this assistant's LoRA is trained on,
        without the LoRA (its own per-request caches; freed with this runner's keys):
        what the assistant knows before it learnt the forget set
        (``contrastive_gain_gate``). ValueError for a full (merged) assistant."""
        with self._lock:
            if self.is_shallow:
                return self
            if self._shallow is None:
                self._shallow = AssistantRunner(self.model_dir, str(self.device), self.dtype,
                                                shallow=True)
            return self._shallow

    def free(self, key: Hashable) -> None:
        """Drop a request's cache (no-op for an unknown key), its shallow twin's too."""
        with self._lock:
            self._cache.pop(key, None)
            if self._shallow is not None:
                self._shallow.free(key)

    def active_keys(self) -> list[Hashable]:
        """Keys that currently hold a KV cache."""
        with self._lock:
            return list(self._cache)

    # ------------------------------------------------------------------ internals
    def _forward(self, rows: int, **kw: Any) -> Any:
        """The model's forward; on a shared base, with this runner's LoRA for every row
        (peft's per-row `adapter_names`: no global adapter switch, nothing merged)."""
        if self._shared is None:
            return self.model(**kw)
        with self._shared.lock:
            return self._shared.model(adapter_names=[self._adapter] * rows, **kw)

    def _prefill(self, tokens: tuple[int, ...]) -> _CachedRequest:
        """Forward the whole sequence of one request from an empty cache."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        res = self._forward(1, input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = res.past_key_values
        layers = cache.layers
        return _CachedRequest(
            tokens=tokens,
            keys=[layer.keys[0] for layer in layers],
            values=[layer.values[0] for layer in layers],
            logits=res.logits[0, -1].float(),
        )

    def _extend_batch(self, extend: list[tuple[int, Hashable, tuple[int, ...]]],
                      out: torch.Tensor) -> None:
        """One forward pass for all rows that append tokens to an existing cache.

        Layout of row ``i`` in the `[n, Lc + T]` key axis: left padding, its ``L_i``
        cached positions ending at ``Lc``, more padding, its ``T_i`` new tokens ending at
        ``Lc + T``. Padding is masked out, so every query sees exactly its own prefix.
        """
        from transformers import DynamicCache

        states = [self._cache[key] for _, key, _ in extend]
        cached = [len(s.tokens) for s in states]
        new = [tokens[c:] for (_, _, tokens), c in zip(extend, cached, strict=True)]
        n, lc, t = len(extend), max(cached), max(len(x) for x in new)
        dev = self.device

        input_ids = torch.zeros((n, t), dtype=torch.long, device=dev)
        position_ids = torch.zeros((n, t), dtype=torch.long, device=dev)
        mask = torch.zeros((n, lc + t), dtype=torch.long, device=dev)
        for i, (c, x) in enumerate(zip(cached, new, strict=True)):
            input_ids[i, t - len(x):] = torch.tensor(x, dtype=torch.long, device=dev)
            position_ids[i, t - len(x):] = torch.arange(c, c + len(x), device=dev)
            mask[i, lc - c: lc] = 1
            mask[i, lc + t - len(x):] = 1

        n_layers = len(states[0].keys)
        data = []
        for layer in range(n_layers):
            k = torch.stack([torch.nn.functional.pad(s.keys[layer], (0, 0, lc - c, 0))
                             for s, c in zip(states, cached, strict=True)])
            v = torch.stack([torch.nn.functional.pad(s.values[layer], (0, 0, lc - c, 0))
                             for s, c in zip(states, cached, strict=True)])
            data.append((k, v))
        cache = DynamicCache(ddp_cache_data=data)
        res = self._forward(len(extend), input_ids=input_ids, attention_mask=mask,
                            position_ids=position_ids, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
        layers = res.past_key_values.layers
        logits = res.logits[:, -1].float()
        for i, ((row, _key, tokens), s, c, x) in enumerate(
                zip(extend, states, cached, new, strict=True)):
            s.keys = [torch.cat([ly.keys[i, :, lc - c: lc], ly.keys[i, :, lc + t - len(x):]],
                                dim=1) for ly in layers]
            s.values = [torch.cat([ly.values[i, :, lc - c: lc],
                                   ly.values[i, :, lc + t - len(x):]], dim=1) for ly in layers]
            s.tokens = tokens
            s.logits = logits[i]
            out[row] = logits[i]


_RUNNERS: dict[tuple[str, str], AssistantRunner] = {}
_RUNNERS_LOCK = threading.Lock()
_SHARED_LOCK = threading.Lock()
_DIGESTS: dict[str, str] = {}  # resolved assistant dir -> sha256 of its files
_DIGESTS_LOCK = threading.Lock()


def assistant_digest(model_dir: str | Path) -> str:
    """sha256 over an assistant directory's files (relative names and bytes), memoised
    per path: the identity two policies' assistants share when their content is equal."""
    root = Path(model_dir).resolve()
    key = str(root)
    with _DIGESTS_LOCK:
        hit = _DIGESTS.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    digest = h.hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return digest


def get_runner(model_dir: str | Path, device: str = "cpu") -> AssistantRunner:
    """The process-wide runner for the assistant in `model_dir` on `device`, loaded on
    first use (thread-safe). Keyed by the assistant's content (`assistant_digest`), so
    tenants whose policies carry the same assistant (compiled from the same forget set,
    copied into the store once per version) share one model in memory."""
    resolved = Path(model_dir).resolve()
    key = (assistant_digest(resolved), str(torch.device(device)))
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = AssistantRunner(str(resolved), device=device)
            _RUNNERS[key] = runner
        return runner
