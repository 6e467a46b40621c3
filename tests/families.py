"""Tiny random-weight models of each mlx-lm family mlxq must serve, built inside the test suite (nothing downloaded).

Each is an mlx-lm model directory (config.json, model.safetensors, SmolLM2's real tokenizer) that `mlx_lm.load` and
`worker.engine.Engine.load` read. Together they hold every kind of cache a layer keeps: plain attention (llama, also
4-bit quantized), a mixture of experts (qwen3_moe), linear-attention recurrent state (qwen3_next), Mamba2 state
(granitemoehybrid, and nemotron_h, whose batching needs worker/model_fixes.py), a sliding window shorter than the test prompts (gemma3_text), and an SSM and attention side by
side in every layer (falcon_h1: a CacheList per layer).

Weights are random but deterministic (mx.random.seed). Every float matrix but the embedding is scaled by 3: with the
default initialization some families answer one token over and over, which no equality test can tell apart.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from tests.factories import TOKENIZER_FILES

VOCAB = 49152  # SmolLM2's tokenizer
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
QUANTIZATION = {"group_size": 32, "bits": 4}

FAMILIES: dict[str, dict[str, Any]] = {
    # Plain attention: a KVCache per layer, trimmable to any shorter prompt.
    "llama": {
        **COMMON,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-5,
    },
    # Hybrid: GatedDeltaNet linear attention (ArraysCache) in layers 0-2, full attention in layer 3; MoE MLPs.
    "qwen3_next": {
        **COMMON,
        "model_type": "qwen3_next",
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 64,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "full_attention_interval": 4,
    },
    # SSM hybrid: Mamba2 (ArraysCache), attention, Mamba2; MoE MLPs.
    "granitemoehybrid": {
        **COMMON,
        "model_type": "granitemoehybrid",
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "attention_bias": False,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "layer_types": ["mamba", "attention", "mamba"],
        "rms_norm_eps": 1e-5,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 64,
        "mamba_n_heads": 8,  # transformers' config check: heads * head dim == 2 * hidden
        "mamba_d_head": 16,
        "mamba_proj_bias": False,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
    },
    # Sliding window: layers 0 and 2 keep a RotatingKVCache of 32 tokens, shorter than the test conversations.
    "gemma3_text": {
        **COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 32,
        "sliding_window_pattern": 2,
        "rms_norm_eps": 1e-6,
    },
    # Mixture of experts, plain attention.
    "qwen3_moe": {
        **COMMON,
        "model_type": "qwen3_moe",
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "norm_topk_prob": True,
    },
    # Multi-head latent attention (DeepSeek-V3's, as Kimi K2 and GLM-4.7-Flash have it): each layer's KVCache holds a
    # latent as its keys and the rotary part as its values, of different widths; mixture of experts after a dense layer.
    "deepseek_v3": {
        **COMMON,
        "model_type": "deepseek_v3",
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
    },
    # Nemotron-H: Mamba2, attention, Mamba2 and an MLP as layers of their own. mlx-lm 0.32.2 batches it wrongly
    # without worker/model_fixes.py.
    "nemotron_h": {
        **COMMON,
        "model_type": "nemotron_h",
        "intermediate_size": 128,
        "hybrid_override_pattern": ["M", "*", "M", "-"],
        "attention_bias": False,
        "head_dim": 16,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
    },
    # Mamba2 and attention in parallel in every layer: a CacheList(ArraysCache, KVCache) per layer.
    "falcon_h1": {
        **COMMON,
        "model_type": "falcon_h1",
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "head_dim": 16,
        "mamba_d_conv": 4,
        "mamba_d_head": 16,
        "mamba_d_ssm": 64,
        "mamba_d_state": 16,
        "mamba_expand": 1,
        "mamba_n_groups": 1,
        "mamba_n_heads": 4,
        "mamba_chunk_size": 32,
        "rope_theta": 10000.0,
    },
}

# Each family at the built-in SmolLM2-135M's width and about its depth (hidden 576, 9 heads of 64, 3 KV heads, MLPs
# of 1,536): the size of the smallest model a user runs, where a forward costs what the model's compute does and not
# each server's fixed path. scripts/bench_arch.py --size real measures them; the tests keep the tiny ones.
REAL_WIDTH: dict[str, Any] = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
}
REAL_SIZE: dict[str, dict[str, Any]] = {
    "llama": {"num_hidden_layers": 30},
    "qwen3_next": {
        "num_hidden_layers": 24,  # 18 GatedDeltaNet layers, 6 of full attention
        "head_dim": 64,
        "linear_num_value_heads": 8,
        "linear_num_key_heads": 4,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "num_experts": 8,
        "shared_expert_intermediate_size": 768,
        "moe_intermediate_size": 384,
    },
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention", "mamba"] * 8,
        "num_hidden_layers": 24,
        "num_local_experts": 8,
        "intermediate_size": 384,  # each expert's
        "shared_intermediate_size": 768,
        "mamba_n_heads": 18,
        "mamba_d_head": 64,
        "mamba_d_state": 64,
    },
    "gemma3_text": {
        "num_hidden_layers": 30,
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 512,
        "sliding_window_pattern": 6,  # five sliding layers to one global, as Gemma 3 has them
    },
    "qwen3_moe": {"num_hidden_layers": 24, "head_dim": 64, "num_experts": 8, "moe_intermediate_size": 384},
    "deepseek_v3": {
        "num_hidden_layers": 24,
        "moe_intermediate_size": 384,
        "n_routed_experts": 8,
        "kv_lora_rank": 256,
        "q_lora_rank": 384,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
    },
    "nemotron_h": {
        "hybrid_override_pattern": ["M", "-", "M", "*", "M", "-"] * 5,  # 15 Mamba2 layers, 5 attention, 10 MLPs
        "head_dim": 64,
        "mamba_num_heads": 18,
        "mamba_head_dim": 64,
        "ssm_state_size": 64,
    },
    "falcon_h1": {
        "num_hidden_layers": 24,
        "head_dim": 64,
        "mamba_d_head": 64,
        "mamba_d_ssm": 576,
        "mamba_d_state": 64,
        "mamba_n_heads": 9,
        "mamba_chunk_size": 128,
    },
}


# The models the tests run, by test id: (family, 4-bit quantized).
MODELS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", False),
    "llama-q4": ("llama", True),
    "qwen3_next": ("qwen3_next", False),
    "granitemoehybrid": ("granitemoehybrid", False),
    "gemma3_text": ("gemma3_text", False),
    "qwen3_moe": ("qwen3_moe", False),
    "falcon_h1": ("falcon_h1", False),
    "nemotron_h": ("nemotron_h", False),
    "deepseek_v3": ("deepseek_v3", False),
}


def build(
    family: str, dest: Path, tokenizer_from: Path, *, quantize: bool = False, seed: int = 0, real: bool = False
) -> Path:
    """Write the tiny model of `family` (a key of FAMILIES), or with `real` the one of SmolLM2-135M's size
    (REAL_SIZE), to `dest` as an mlx-lm model directory, 4-bit quantized (group size 32, as `mlx_lm.convert -q`
    would) when asked, with the tokenizer files of `tokenizer_from`."""
    from worker.blas import preload_openblas

    preload_openblas()
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map_with_path

    config = dict(FAMILIES[family], eos_token_id=2, bos_token_id=1)
    if real:
        config.update(REAL_WIDTH, **REAL_SIZE[family])
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))

    def spread(path: str, value: mx.array) -> mx.array:
        matrix = value.ndim >= 2 and "embed" not in path and mx.issubdtype(value.dtype, mx.floating)
        return value * 3 if matrix else value

    model.update(tree_map_with_path(spread, model.parameters()))
    if quantize:
        nn.quantize(
            model,
            group_size=QUANTIZATION["group_size"],
            bits=QUANTIZATION["bits"],
            class_predicate=lambda _path, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % QUANTIZATION["group_size"] == 0
            ),
        )
        config["quantization"] = dict(QUANTIZATION)
    mx.eval(model.parameters())
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, dest / name)
    return dest
