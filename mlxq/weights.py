"""A model directory's fingerprint: what the response-cache key and the prefix cache name the weights by.

A model name says nothing about its weights (`mlxq models pull` again, a fine-tune saved over the old
directory, another quantization under the same id), and an answer is only valid for the weights that
made it. The fingerprint hashes the files that decide the answer: config, tokenizer and chat template
whole, and of each weight file its size, head and tail. A safetensors head is its header (every
tensor's name, dtype, shape and offset); together with the tail it changes when the weights do, while
hashing gigabytes on every start would not be worth the certainty. It depends on content only, so a
copy of a model on another machine (an api container, a second worker) gets the same fingerprint.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_WHOLE = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_EDGE = 1 << 20


def fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _WHOLE:
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name}\0".encode())
            digest.update(path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_EDGE))
            if size > 2 * _EDGE:
                f.seek(size - _EDGE)
                digest.update(f.read(_EDGE))
    return digest.hexdigest()[:16]


@lru_cache
def local_fingerprint(model: str) -> str | None:
    """The fingerprint of `model` when it is a directory on this machine (None for a hub id or a remote
    worker's model: then the worker publishes it)."""
    path = Path(model).expanduser()
    return fingerprint(path) if (path / "config.json").is_file() else None
