"""The memory budget (worker.memory): the split adds up, the prefix cache evicts within its share, a model that
does not fit fails to load saying so, and a real worker under a small budget serves many concurrent long prompts
within budget + allowance, reporting parts that add up to what MLX holds."""

from __future__ import annotations

import gc
import random
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL_NAME, service_env
from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402

from worker.engine import Engine, wait  # noqa: E402
from worker.memory import (  # noqa: E402
    GIB,
    MIB,
    MIN_WORKING,
    Budget,
    KvShape,
    ModelTooLarge,
    prefill_sizes,
)

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
WORDS = "river stone lantern orchard copper meadow harbor violet thunder cedar marble falcon".split()


def long_prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"Note {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def test_the_split_adds_up_to_the_budget_and_a_fixed_prefix_share_is_kept():
    for total in (4 * GIB, 24 * GIB):  # the buffer cache's share under its cap, and over it (what is over goes to KV)
        b = Budget.split(total, {"model": GIB}, 300 * MIB)
        parts = b.weights + b.kv + b.prefix + b.prefill + b.buffer_cache
        assert b.total - 8 <= parts <= b.total
        assert b.kv > b.prefix > b.prefill > b.buffer_cache > 0
        fixed = Budget.split(total, {"model": GIB}, 300 * MIB, prefix=100 * MIB)
        assert fixed.prefix == 100 * MIB and fixed.kv + fixed.prefix == b.kv + b.prefix


def test_a_budget_with_no_room_beyond_the_weights_is_refused_with_the_setting_named():
    with pytest.raises(ModelTooLarge, match="MLXQ_MEMORY_GB"):
        Budget.split(GIB, {"model": GIB - MIN_WORKING + MIB}, 0, model="big")


def test_prefill_is_sized_to_its_share_and_the_batch_cache_is_counted_padded():
    chunk, sequences = prefill_sizes(64 * MIB, 100_000, chunk=512, sequences=8)
    assert chunk * sequences * 100_000 <= 64 * MIB and chunk <= 512 and sequences >= 1
    assert prefill_sizes(1 << 40, 1000, chunk=512, sequences=8) == (512, 8)
    assert prefill_sizes(0, 1000, chunk=512, sequences=8) == (64, 1)  # never below one small chunk
    # Three sequences padded to the longest reservation, each row up to one of mlx-lm's 256-token growth steps
    # (less one) past it; one sequence alone grown from empty holds whole steps.
    assert KvShape(per_token=10).reservation(300, 3) == 3 * (300 + 255) * 10
    assert KvShape(per_token=10).sequence_bytes(300) == 512 * 10
    # Each with its fixed (recurrent) state, and its windows never past their size and a prefill chunk.
    shape = KvShape(per_token=10, windows=((32, 4),), fixed=1000)
    assert shape.reservation(300, 3, chunk=16) == 3 * (555 * 10 + (32 + 15) * 4 + 1000)
    assert shape.reservation(300, 0) == 0


def test_a_model_larger_than_the_budget_fails_to_load_with_the_message(smollm2: Path):
    with pytest.raises(ModelTooLarge, match=r"more than its memory budget of 0\.20 GB.*MLXQ_MEMORY_GB"):
        Engine.load(str(smollm2), memory=200 * MIB)  # refused from the files on disk, before loading
    with pytest.raises(ModelTooLarge, match="MLXQ_MEMORY_GB"):
        Engine.load(str(smollm2), memory=600 * MIB)  # its float32 weights, measured at load, leave too little


def test_the_prefix_cache_evicts_within_its_share_under_concurrent_long_prompts(smollm2: Path):
    # MLX counts memory per process: the budget sits on top of what other tests' engines in this process hold.
    gc.collect()
    held_before = mx.get_active_memory()
    engine = Engine.load(str(smollm2), memory=held_before + 800 * MIB, prefix_bytes=64 * MIB)
    try:
        prefix = engine.enable_prefix_cache(max_entries=64)
        assert prefix.max_bytes == engine.budget.prefix
        seqs = [
            engine.submit("completion", {"prompt": long_prompt(i, 160), "max_tokens": 4, "temperature": 0})
            for i in range(12)
        ]
        for seq in seqs:
            assert wait(seq, lambda _e: None)["usage"]["completion_tokens"] >= 1
        held = sum(len(s.prompt) * engine.kv_shape.per_token + engine.kv_shape.fixed for s in seqs)
        assert held > engine.budget.prefix, "the test must offer the cache more than its share"
        assert 0 < prefix.lru.nbytes <= engine.budget.prefix
        assert len(prefix.lru) < len(seqs)
        # Entries hold only their own bytes: MLX holds the weights and the cache, nothing else, once idle.
        assert mx.get_active_memory() - held_before - engine.budget.weights - prefix.lru.nbytes < 16 * MIB
    finally:
        engine.close()


def test_a_worker_under_a_small_budget_serves_concurrent_long_prompts_within_it(
    tmp_path: Path, smollm2: Path, service_factory
):
    # 0.8 GB of MLX memory for SmolLM2's 0.54 GB of float32 weights: eight ~900-token prompts at once would
    # take 0.3 GB of KV in flight, as much again in the prefix cache, and more in prefill buffers.
    svc = service_factory(service_env(tmp_path, smollm2, MLXQ_MEMORY_GB="0.8")).start()
    oa = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=600)
    answers: list[str | None] = [None] * 8

    def one(i: int) -> None:
        r = oa.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": long_prompt(100 + i, 700) + "\nSummarize."}],
            temperature=0,
            max_tokens=8,
            extra_headers=NO_CACHE,
        )
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert all(a is not None for a in answers), svc.logs()

    # Once the batch is done, the entries it pushed out of the prefix cache are written to the disk tier (until then
    # they are held apart, as `prefix_spilling`: CI once read 61 MB of them) and a heartbeat has reported it: the parts
    # add up, and the peak stayed inside. The heap goes back to the system once the batch has rested a moment
    # (worker.batcher.IDLE_TRIM_S): until then the process may hold the batch's transients beyond its allowance.
    health = svc.wait_health(
        lambda h: (
            h["batch"]["active"] == 0
            and (m := h["workers"][0]["memory"]).get("kv_in_flight") == 0
            and m.get("prefix_spilling") == 0
            and m["rss"] <= m["mlx_active"] + m["mlx_cache"] + m["allowance"]
        ),
        timeout=60,
    )
    memory = health["workers"][0]["memory"]
    assert memory["total"] == int(0.8 * GIB)
    assert memory["prefix_cache"] <= memory["prefix"]
    assert abs(memory["mlx_active"] - memory["weights"] - memory["prefix_cache"]) < 32 * MIB, memory
    assert memory["mlx_peak"] <= memory["total"], memory
    assert memory["rss_peak"] <= memory["total"] + memory["allowance"], memory
    assert memory["rss"] <= memory["mlx_active"] + memory["mlx_cache"] + memory["allowance"], memory
    metrics = httpx.get(f"{svc.base}/metrics", timeout=5).text
    assert 'mlxq_worker_memory_bytes{model="SmolLM2-135M-Instruct",part="total"' in metrics


def test_a_worker_whose_model_does_not_fit_says_so_in_health_and_in_each_answer(
    tmp_path: Path, tiny_model: Path, service_factory
):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_MEMORY_GB="0.1")).start(wait_model=False)
    health = svc.wait_health(lambda h: h["worker"]["error"])
    assert "MLXQ_MEMORY_GB" in health["worker"]["error"] and not health["model_loaded"]
    oa = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as refused:
        oa.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert refused.value.status_code == 503 and "MLXQ_MEMORY_GB" in refused.value.message
