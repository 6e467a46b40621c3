"""What a worker loads (`ModelSpec`: a model, and optionally a draft model and a LoRA adapter) and the identity of
what it loaded (`ModelKey`): the prefix cache keys KV by it, so an adapter's KV is never served to the base model
(or another adapter's), and the response cache names answers by its `weights`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mlxq.weights import fingerprint

# mlx-lm reads an adapter directory's settings (rank, scale, layers) from this file; mlxq.weights hashes a model's
# files, not it, yet it changes what the adapter does.
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ModelSpec:
    """A model directory, a draft model's directory for speculative decoding (worker.speculative), and
    an mlx-lm LoRA adapter's directory (`adapters.safetensors`, `adapter_config.json`) applied to the model."""

    path: str
    draft: str | None = None
    adapter: str | None = None

    @classmethod
    def of(cls, model: str | ModelSpec) -> ModelSpec:
        return model if isinstance(model, ModelSpec) else cls(model)

    def directories(self) -> dict[str, Path]:
        """Each set of weights by the name the memory budget reports it under: model, adapter, draft."""
        named = {"model": self.path, "adapter": self.adapter, "draft": self.draft}
        return {name: Path(path).expanduser() for name, path in named.items() if path}


@dataclass(frozen=True)
class ModelKey:
    """Hashable, stable identity of the loaded weights (never the model object itself); "" for a part not loaded."""

    path: str
    revision: str
    draft: str = ""
    adapter: str = ""

    @property
    def weights(self) -> str:
        """What names the answers (response-cache keys, the fingerprint the worker publishes): the model's
        fingerprint, combined with its adapter's when it has one. The draft model is left out: its drafts are
        greedy point masses, which the acceptance rule keeps exact (the answers are the model's alone)."""
        if not self.adapter:
            return self.revision
        return hashlib.sha256(f"{self.revision}:{self.adapter}".encode()).hexdigest()[:16]


def adapter_fingerprint(directory: Path) -> str:
    """The adapter's weights (mlxq.weights) and its config together."""
    config = directory / ADAPTER_CONFIG
    digest = hashlib.sha256(fingerprint(directory).encode())
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


def model_key(spec: ModelSpec) -> ModelKey:
    dirs = spec.directories()
    return ModelKey(
        str(dirs["model"].resolve()),
        fingerprint(dirs["model"]),
        draft=fingerprint(dirs["draft"]) if "draft" in dirs else "",
        adapter=adapter_fingerprint(dirs["adapter"]) if "adapter" in dirs else "",
    )
