"""Hashed word n-grams, the features of the `dsir` and `classifier` baselines.

A text becomes the bucket ids of its word unigrams and bigrams, hashed into `n_features`
buckets with CRC-32 (stable across processes, unlike Python's salted `hash`). DSIR (Xie et al.
2023) uses exactly this: unigrams + bigrams, 10,000 buckets; fastText-style quality filters
(DCLM) average learned vectors over the same kind of ids.
"""
from __future__ import annotations

import re
import zlib

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def ngram_ids(text: str, n_features: int, max_n: int = 2) -> np.ndarray:
    """Bucket ids [M] (int64) of the lower-cased word 1..max_n-grams of `text`, in text order."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)]
    return np.fromiter((zlib.crc32(g.encode()) % n_features for g in grams), dtype=np.int64,
                       count=len(grams))


def ngram_bags(texts: list[str], n_features: int, max_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """All texts' ids, concatenated [sum M], and each text's offset [N] (an EmbeddingBag input)."""
    bags = [ngram_ids(t, n_features, max_n) for t in texts]
    offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).astype(np.int64)
    flat = np.concatenate(bags) if bags else np.zeros(0, dtype=np.int64)
    return flat, offsets


def ngram_counts(texts: list[str], n_features: int, max_n: int = 2) -> np.ndarray:
    """Total count per bucket over all `texts` [n_features] (float64)."""
    flat, _ = ngram_bags(texts, n_features, max_n)
    return np.bincount(flat, minlength=n_features).astype(np.float64)


def ngram_features(texts: list[str], n_features: int, max_n: int = 2) -> np.ndarray:
    """Dense features [N, n_features] (float32): log(1 + count) per bucket, each row L2-normalised
    so that long and short texts weigh alike. The `backbone: ngram` influence model's input."""
    out = np.zeros((len(texts), n_features), dtype=np.float32)
    for row, text in enumerate(texts):
        counts = np.bincount(ngram_ids(text, n_features, max_n), minlength=n_features)
        out[row] = np.log1p(counts)
        norm = float(np.linalg.norm(out[row]))
        if norm > 0:
            out[row] /= norm
    return out
