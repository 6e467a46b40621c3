"""The KV budget for every cache kind mlx-lm has (worker.memory.KvShape): measured once on a one-token forward, its
estimate of one sequence's cache equals the bytes of a real cache after N tokens (bounds them, for a sliding window
while a prompt is prefilled in chunks), for plain attention, quantized KV, recurrent state (qwen3_next's GatedDeltaNet,
granitemoehybrid's Mamba2), a sliding window (gemma3_text) and a CacheList per layer (falcon_h1); and the batcher's
admission counts each sequence's recurrent state.

The tiny random-weight models of tests.families, built in memory (their sizes, not their answers, matter here)."""

from __future__ import annotations

import importlib
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.families import FAMILIES
from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache  # noqa: E402

from worker.engine import BatchLimits, Engine, wait  # noqa: E402
from worker.generator import Admission, Generator, GeneratorConfig, Step, mlx_batch_generator  # noqa: E402
from worker.memory import KV_STEP, MIB, Budget, KvShape, kv_shape  # noqa: E402
from worker.model_spec import ModelKey  # noqa: E402

# float32 KV: 2 kv heads x 16 dims x (keys + values) x 4 bytes = 256 bytes per token per attention layer. Fixed
# state per recurrent layer, float32: its convolution's last (kernel - 1) inputs and its recurrent state.
SHAPES = {
    "llama": KvShape(per_token=2 * 256),
    # 3 GatedDeltaNet layers: 3 x 128 conv channels + 4 value heads x 16 x 16.
    "qwen3_next": KvShape(per_token=256, fixed=3 * (3 * 128 + 4 * 16 * 16) * 4),
    # 2 Mamba2 layers: 3 x (128 + 2 x 16) conv channels + 8 heads x 16 dims x 16 states.
    "granitemoehybrid": KvShape(per_token=256, fixed=2 * (3 * 160 + 8 * 16 * 16) * 4),
    # 2 sliding windows of 32 tokens beside 2 global layers.
    "gemma3_text": KvShape(per_token=2 * 256, windows=((32, 256), (32, 256))),
    # 2 layers of CacheList(Mamba2, attention): 3 x (64 + 2 x 16) conv channels + 4 heads x 16 x 16.
    "falcon_h1": KvShape(per_token=2 * 256, fixed=2 * (3 * 96 + 4 * 16 * 16) * 4),
}


def build(family: str, **overrides: Any) -> nn.Module:
    """The family's tiny model (tests.families) in memory, its weights as initialized."""
    config = {**FAMILIES[family], **overrides}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def family(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build(request.param)


def nbytes(cache: list[Any]) -> int:
    return sum(c.nbytes for c in cache)  # CacheList and ArraysCache count their parts


def prefill(model: nn.Module, cache: list[Any], tokens: int, chunk: int) -> int:
    """Feed `tokens` tokens in chunks of `chunk` (as BatchGenerator prefills): the bytes the cache then holds."""
    ids = [(7 * i + 3) % 1000 + 1 for i in range(tokens)]
    for start in range(0, tokens, chunk):
        model(mx.array([ids[start : start + chunk]]), cache=cache)
        mx.eval([c.state for c in cache])
    return nbytes(cache)


def decode(model: nn.Module, cache: list[Any]) -> int:
    model(mx.array([[5]]), cache=cache)
    mx.eval([c.state for c in cache])
    return nbytes(cache)


def test_each_family_has_the_shape_of_its_cache_kinds(family: tuple[str, nn.Module]):
    name, model = family
    assert kv_shape(model) == SHAPES[name]


@pytest.mark.parametrize("tokens", [1, 40, 256, 300, 700])
def test_the_estimate_is_what_a_real_cache_holds_after_n_tokens(family: tuple[str, nn.Module], tokens: int):
    name, model = family
    shape = kv_shape(model)
    # Prefilled in chunks of 64 (the engine's chunk is a multiple of 64, so KV grows in whole 256-token steps):
    # exact, except that a window holds a chunk over its size at most while prefilling.
    cache = make_prompt_cache(model)
    held = prefill(model, cache, tokens, 64)
    if shape.windows:
        assert held <= shape.sequence_bytes(tokens, chunk=64)
        assert held >= shape.sequence_bytes(tokens) - sum(size * b for size, b in shape.windows)
    else:
        assert held == shape.sequence_bytes(tokens, chunk=64)
    # Decoding: every window is back to its size, and the estimate is exact for every kind.
    assert decode(model, cache) == shape.sequence_bytes(tokens + 1)
    assert shape.reservation(tokens + 1, 3) >= 3 * shape.sequence_bytes(tokens + 1)


def test_a_batch_merged_from_a_cached_prefix_stays_within_the_reservation(family: tuple[str, nn.Module]):
    # As a prefix-cache hit enters the batch: its 300 tokens merged into mlx-lm's batch form, sized to exactly what
    # it holds, then 512 more prefilled in one chunk and one decoded. The KV now holds 813 tokens in 300 + 512 +
    # 256 slots: more than whole steps from empty would (1024), within the reservation's step less one past.
    name, model = family
    shape = kv_shape(model)
    cache = make_prompt_cache(model)
    prefill(model, cache, 300, 64)
    batch = [c.merge([c]) for c in cache]
    prefill(model, batch, 512, 512)
    held = decode(model, batch)
    assert held <= shape.reservation(813, 1, chunk=512)
    if name == "llama":
        assert held > shape.sequence_bytes(813)


@pytest.mark.parametrize("chunk", [100, 192, 512])
def test_chunks_out_of_step_with_the_growth_step_stay_within_the_reservation(family: tuple[str, nn.Module], chunk: int):
    # A chunk that is neither a divisor nor a multiple of 256 leaves KV grown past the part in use: 900 tokens in
    # chunks of 100 take 1056 slots (more than whole steps from empty would), never a step or more past the tokens.
    _, model = family
    shape = kv_shape(model)
    cache = make_prompt_cache(model)
    assert prefill(model, cache, 900, chunk) <= shape.reservation(900, 1, chunk=chunk)
    assert decode(model, cache) <= shape.reservation(901, 1, chunk=chunk)


def test_a_quantized_kv_cache_is_measured_without_crashing_and_exactly():
    # head_dim 32, so 4-bit groups of 32 fit: per token per layer (keys + values) x (32 dims / 8 per uint32 x 4
    # bytes + a float32 scale + a float32 bias) = 2 x 24 bytes.
    model = build("llama", num_attention_heads=2, num_key_value_heads=1)
    shape = kv_shape(model, [QuantizedKVCache(group_size=32, bits=4) for _ in model.layers])
    assert shape == KvShape(per_token=2 * 2 * 24)
    assert shape.per_token < kv_shape(model).per_token  # float32 KV: 2 x 2 x 32 x 4 = 512
    for tokens in (1, 300):
        cache = [QuantizedKVCache(group_size=32, bits=4) for _ in model.layers]
        assert prefill(model, cache, tokens, 64) == shape.sequence_bytes(tokens)
        assert decode(model, cache) == shape.sequence_bytes(tokens + 1)


def test_the_longest_sequence_within_a_budget():
    assert KvShape(per_token=10, fixed=100).longest(10 * 512 + 100, cap=4096) == 512
    assert KvShape(per_token=10, fixed=100).longest(10 * 512 + 99, cap=4096) == 256
    assert KvShape(per_token=10, fixed=100).longest(99, cap=4096) == 0  # not even its state fits
    assert KvShape(fixed=100, windows=((32, 8),)).longest(100 + 32 * 8, cap=4096) == 4096  # never grows
    assert KvShape(per_token=10).longest(1 << 40, cap=4096) == 4096


class Counting:
    """mlx-lm's generator, counting the sequences in its batch at once."""

    def __init__(self, config: GeneratorConfig, stream: Any) -> None:
        self.inner: Generator = mlx_batch_generator(config, stream)
        self.live: set[int] = set()
        self.most = 0

    def admit(self, admission: Admission) -> int:
        uid = self.inner.admit(admission)
        self.live.add(uid)
        self.most = max(self.most, len(self.live))
        return uid

    def step(self) -> Step:
        step = self.inner.step()
        self.live -= {g.uid for g in step.generated if g.finish_reason}
        return step

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        self.live.discard(uid)
        return self.inner.extract(uid)

    def remove(self, uid: int) -> None:
        self.live.discard(uid)
        self.inner.remove(uid)


def test_admission_counts_each_sequences_recurrent_state(smollm2: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    model = build("granitemoehybrid")
    shape = kv_shape(model)
    assert shape.fixed > 0
    tokenizer = load_tokenizer(smollm2)
    requests = [
        {"messages": [{"role": "user", "content": f"question {i}"}], "temperature": 0.0, "max_tokens": 20}
        for i in range(8)
    ]
    made: list[Counting] = []

    def counting(config: GeneratorConfig, stream: Any) -> Generator:
        made.append(Counting(config, stream))
        return made[-1]

    def engine_with(budget: Budget, batch: BatchLimits) -> Engine:
        return Engine(model, tokenizer, ModelKey("granitemoehybrid", "test"), 4096, batch, budget, generator=counting)

    budget = Budget(total=8 << 30, allowance=0, weights=0, kv=1 << 30, prefix=0, prefill=1 << 30, buffer_cache=64 * MIB)
    longest = max(len(engine_with(budget, BatchLimits()).chat_tokens(r)) + 20 for r in requests)
    # Room for 7 sequences with their Mamba2 state; counting KV tokens alone (as before), 8 would fit.
    kv = shape.reservation(longest, 7) + shape.fixed // 2
    assert 8 * 256 * shape.per_token <= kv < shape.reservation(longest, 8)
    engine = engine_with(replace(budget, kv=kv), BatchLimits(size=8))
    try:
        assert engine.kv_shape == shape and engine.kv_limit == kv
        # Hold the engine thread while all eight arrive, so they are admitted in one pass.
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(60)

        blocker = threading.Thread(target=engine.batcher.call, args=(hold,))
        blocker.start()
        assert held.wait(30)
        seqs = [engine.submit("chat", r) for r in requests]
        assert max(s.budget for s in seqs) == longest
        release.set()
        blocker.join(30)
        results = [wait(s, lambda _e: None) for s in seqs]
        assert all(r["usage"]["completion_tokens"] >= 1 for r in results)
        assert made[-1].most == 7  # the eighth waited for room
        memory = engine.memory()
        assert memory["kv_limit"] == kv and memory["kv_in_flight"] == 0
        # A sequence's reservation is what its cache costs, recurrent state included.
        reserved = engine.batcher.call(lambda: engine.batcher._kv_bytes(seqs[0]))
        assert reserved == shape.reservation(seqs[0].budget, 1, chunk=engine.prefill_step)
        assert reserved == (seqs[0].budget + KV_STEP - 1) * shape.per_token + shape.fixed
    finally:
        engine.close()
    # MLXQ_BATCH_TOKENS counts the growing KV; each sequence of the batch has its state beside it.
    engine = engine_with(budget, BatchLimits(size=4, tokens=1000))
    try:
        assert engine.kv_limit == 1000 * shape.per_token + 4 * shape.fixed
    finally:
        engine.close()
