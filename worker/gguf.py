"""Turn the built-in SmolLM2 GGUF file into an ordinary mlx-lm model directory.

mlx-lm loads GGUF only as raw arrays, so the mapping to its llama module names,
the per-module quantization and the tokenizer are rebuilt here once, at pull
time; afterwards the worker loads every model the same way (`mlx_lm.load`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

GROUP_SIZE = 32

# GGUF tensor names -> mlx-lm llama parameter paths.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _mlx_name(gguf_name: str) -> str:
    base, suffix = gguf_name.rsplit(".", 1)
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{suffix}"
    return f"{_TOP_NAMES[base]}.{suffix}"


def _meta(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if hasattr(value, "item") and getattr(value, "size", 2) == 1 else value


def _tokenizer_files(meta: dict[str, Any], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM2's pre-tokenizer ("smollm" in GGUF): single digits, then GPT-2 byte level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens(special)
    bos = tokens[int(_meta(meta, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_meta(meta, "tokenizer.ggml.eos_token_id"))]
    pad = tokens[int(_meta(meta, "tokenizer.ggml.padding_token_id"))]
    unk = tokens[int(_meta(meta, "tokenizer.ggml.unknown_token_id"))]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in special if t not in {bos, eos, pad, unk}],
        chat_template=str(meta["tokenizer.chat_template"]),
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out`."""
    # With return_metadata=True it is (arrays, metadata); mlx's stub gives every form of the result as one union.
    loaded = mx.load(str(gguf_path), return_metadata=True)
    weights, meta = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    if str(meta["general.architecture"]) != "llama":
        raise ValueError(f"only llama GGUF files are supported, got {meta['general.architecture']}")
    out.mkdir(parents=True, exist_ok=True)
    renamed = {_mlx_name(k): v for k, v in weights.items()}

    # Each module keeps the bits its packed weight implies (Q4_1 blocks, Q8_0 embeddings).
    quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": 4}
    for name, scales in renamed.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = renamed[f"{module}.weight"]
        in_dim = scales.shape[-1] * GROUP_SIZE
        bits = packed.shape[-1] * 32 // in_dim
        if bits != quant["bits"]:
            quant[module] = {"group_size": GROUP_SIZE, "bits": bits}

    config = {
        "model_type": "llama",
        "hidden_size": int(_meta(meta, "llama.embedding_length")),
        "intermediate_size": int(_meta(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(meta, "llama.block_count")),
        "num_attention_heads": int(_meta(meta, "llama.attention.head_count")),
        "num_key_value_heads": int(_meta(meta, "llama.attention.head_count_kv")),
        "rms_norm_eps": float(_meta(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(meta, "llama.rope.freq_base")),
        "vocab_size": int(_meta(meta, "llama.vocab_size")),
        "max_position_embeddings": int(_meta(meta, "llama.context_length")),
        # GGUF permutes q/k rows for interleaved RoPE.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in renamed,
        "eos_token_id": int(_meta(meta, "tokenizer.ggml.eos_token_id")),
        "bos_token_id": int(_meta(meta, "tokenizer.ggml.bos_token_id")),
        "quantization": quant,
    }
    mx.save_safetensors(str(out / "model.safetensors"), renamed, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer_files(meta, out)
    return out
