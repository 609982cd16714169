"""A per-machine cache of response embeddings, so re-scoring after a promotion skips the encoder.

The reward model's backbone is frozen: a promotion changes only the heads, so a (prompt,
response) embeds to the same vector before and after. The store keeps each vector in a small
SQLite file under ``RLHF_DATA_DIR/cache/`` keyed by (backbone id, hash of the text pair); the
backbone id names everything that changes an embedding (encoder, pooling, max length), so a
different backbone never reads another's vectors. It is a cache, not the store of record:
deleting the file costs only re-encoding.

    store = EmbeddingStore(path)
    emb = store.embed(model, prompts, responses)  # (N, H): misses encoded once and kept
    store.forget(texts)  # drop every vector whose prompt or response is one of ``texts``
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    backbone TEXT NOT NULL,
    pair_hash TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    response_hash TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (backbone, pair_hash)
);
CREATE INDEX IF NOT EXISTS embeddings_prompt ON embeddings (prompt_hash);
CREATE INDEX IF NOT EXISTS embeddings_response ON embeddings (response_hash);
"""
_LOOKUP_CHUNK = 500  # SQLite's bound-parameter limit is 999 on older builds


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pair_hash(prompt: str, response: str) -> str:
    return text_hash(text_hash(prompt) + text_hash(response))


class EmbeddingStore:
    """Embeddings keyed by (backbone id, text pair) in one SQLite file; safe across threads
    (one connection under a lock) and processes (WAL, busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.hits = 0
        self.misses = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lookup(self, backbone: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors among ``keys`` (pair hashes) for ``backbone``."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = list(keys[start : start + _LOOKUP_CHUNK])
                rows = self._db.execute(
                    "SELECT pair_hash, vector FROM embeddings WHERE backbone = ? AND pair_hash IN "
                    f"({','.join('?' * len(chunk))})",
                    [backbone, *chunk],
                )
                found.update((key, np.frombuffer(blob, dtype=np.float32)) for key, blob in rows)
        return found

    def put(
        self,
        backbone: str,
        prompts: Sequence[str],
        responses: Sequence[str],
        vectors: np.ndarray,
    ) -> None:
        rows = [
            (backbone, pair_hash(p, r), text_hash(p), text_hash(r), v.astype(np.float32).tobytes())
            for p, r, v in zip(prompts, responses, vectors)
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?)", rows)

    def embed(self, model: Any, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """``model.embed(prompts, responses)`` (N, H), encoding only what the store lacks."""
        backbone = model.backbone_id
        keys = [pair_hash(p, r) for p, r in zip(prompts, responses)]
        found = self.lookup(backbone, keys)
        first_of: dict[str, int] = {}  # each missing text pair encoded once
        for i, key in enumerate(keys):
            if key not in found:
                first_of.setdefault(key, i)
        todo = list(first_of.values())
        if todo:
            encoded = model.embed([prompts[i] for i in todo], [responses[i] for i in todo])
            vectors = encoded.float().cpu().numpy()
            self.put(backbone, [prompts[i] for i in todo], [responses[i] for i in todo], vectors)
            found.update(zip((keys[i] for i in todo), vectors))
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        out = np.stack([found[key] for key in keys]) if keys else np.zeros((0, model.hidden_size))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(model.device)

    def forget(self, texts: Iterable[str]) -> int:
        """Drop every vector (of any backbone) whose prompt or response is one of ``texts``;
        returns how many were dropped. For forgetting a task: pass its prompt and responses."""
        hashes = sorted({text_hash(t) for t in texts})
        dropped = 0
        with self._lock, self._db:
            for start in range(0, len(hashes), _LOOKUP_CHUNK):
                chunk = hashes[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                cursor = self._db.execute(
                    f"DELETE FROM embeddings WHERE prompt_hash IN ({marks}) "
                    f"OR response_hash IN ({marks})",
                    [*chunk, *chunk],
                )
                dropped += cursor.rowcount
        return dropped

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
