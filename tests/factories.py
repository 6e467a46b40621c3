"""Small builders for test data: models on disk, settings, databases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlxq.jobspec import CachePolicy, JobSpec
from mlxq.request import Request

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_model(dest: Path, tokenizer_from: Path, *, seed: int = 0) -> Path:
    """A 2-layer random-weight llama with SmolLM2's real tokenizer: fast, and greedy output is deterministic."""
    from worker.blas import preload_openblas

    preload_openblas()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, dest / name)
    return dest


def job_spec(key: str, *, store: bool = True) -> JobSpec:
    """An interactive chat job's spec with an empty request (for the repositories' tests)."""
    return JobSpec(
        key=key,
        kind="chat",
        request=Request(model="m"),
        cache=CachePolicy(store=store),
        priority="interactive",
        stream=True,
    )
