"""The scheduler's steps, measured in the engine (no api, no queue): what the prefill budget is sized by and what it
gives (issue 25). Three parts, one model (the built-in SmolLM2 as float32, as the other CPU benchmarks run it):

* cost: seconds per prefill token by the context already in the cache (0, 1,000, 2,500) and the chunk's size; on a
  CPU a token deep into a long prompt costs several times one at its start, and a forward's fixed cost grows too.
* pause: one stream decoding, then a long prompt (`--long-tokens`): the longest and the median gap between the
  stream's tokens while the prompt is prefilled, and the prompt's time to its first token beside the stream and
  alone (the step target is MLXQ_STEP_TARGET_MS's default unless `--step-ms`).
* together: 8 short chat prompts admitted at once, 64 tokens each, greedy: tokens/s and when the 8th prompt's first
  token came, of the prefill stage in front of mlx-lm's batch (`ChunkedPrefill`), in front of the drafting batch, and
  of mlx-lm's batch alone (`MLXQ_STEP_TARGET_MS=0`), alternating; and one such prompt alone, its first token.

    .venv/bin/python scripts/bench_steps.py [--parts cost,pause,together] [--long-tokens 3000] [--repeat 3] [--chunks 1,16,64,256]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from worker.blas import preload_openblas  # noqa: E402

preload_openblas()  # before anything imports MLX (bench_agent does)

import mlx.core as mx  # noqa: E402
from bench_agent import builtin_f32  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from worker.engine import weight_sets  # noqa: E402
from worker.generator import DEFAULT_STEP_MS, Admission, Generator, GeneratorConfig, mlx_batch_generator  # noqa: E402
from worker.memory import ALLOWANCE_SLACK, Budget, default_budget, rss  # noqa: E402

TOPICS = ["the printing press", "volcanoes", "the water cycle", "the Roman Empire", "airplanes", "honeybees"]
TOPICS += ["the telephone", "computer memory"]


def admission(tokens: list[int], max_tokens: int) -> Admission:
    return Admission(rest=list(tokens), max_tokens=max_tokens, cache=None, history=[], sampler=None, processors=[])


def generator(model: Any, step_ms: float, speculative: str = "off") -> Generator:
    config = GeneratorConfig(
        model=model,
        eos_ids=(),
        batch_size=16,
        prefill_batch_size=8,
        prefill_step=512,
        long_chunk=512 * 8,  # the engine's, for a model whose every layer's cache grows with the sequence
        step_ms=step_ms,
        speculative=speculative,
    )
    return mlx_batch_generator(config, mx.default_stream(mx.default_device()))


def cost(model: Any, tokens: list[int], chunks: tuple[int, ...] = (1, 16, 64, 256)) -> None:
    print("prefill cost by context (SmolLM2 float32):")
    print("context  chunk  seconds  ms per token")
    for context in (0, 1000, 2500):
        cache = make_prompt_cache(model)
        for i in range(0, context, 512):
            model(mx.array(tokens[i : min(i + 512, context)])[None], cache=cache)
            mx.eval([c.state for c in cache])
        for n in chunks:
            copied = copy.deepcopy(cache)
            mx.eval([c.state for c in copied])
            times = []
            for r in range(3):
                tic = time.perf_counter()
                model(mx.array(tokens[context + r * n : context + (r + 1) * n])[None], cache=copied)
                mx.eval([c.state for c in copied])
                times.append(time.perf_counter() - tic)
            best = min(times)
            print(f"{context:7d}  {n:5d}  {best:7.3f}  {best / n * 1000:12.2f}")


def pause(model: Any, tokenizer: Any, long_tokens: int, step_ms: float, speculative: str = "off") -> None:
    long = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (long_tokens // 9 + 10))[:long_tokens]
    short = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a long essay about the sea."}], add_generation_prompt=True
    )

    def run(beside: bool) -> tuple[float, list[float], float]:
        gen = generator(model, step_ms, speculative)
        decoder = gen.admit(admission(short, 100_000))
        for _ in range(10):
            gen.step()
        if not beside:
            gen.remove(decoder)
        tic = last = time.perf_counter()
        prompt = gen.admit(admission(long, 4))
        gaps = []
        joined = 0.0  # the gap that holds the step where the prompt joined the stream's batch
        while True:
            step = gen.step()
            now = time.perf_counter()
            ended = any(p.uid == prompt and p.finished for p in step.prefilled)
            if any(g.uid == decoder for g in step.generated):
                gaps.append(now - last)
                last = now
                joined = joined or (gaps[-1] if ended else 0.0)
            if any(g.uid == prompt for g in step.generated):
                return now - tic, gaps, joined

    alone, _, _ = run(False)
    beside, gaps, joined = run(True)
    print(
        f"\na {long_tokens}-token prompt beside a decoding stream (step target {step_ms:g} ms, drafting {speculative}):"
    )
    print(
        f"  the stream's longest gap {max(gaps):.2f} s, median {statistics.median(gaps):.2f} s, "
        f"where it joined {joined:.2f} s (target <= 0.5 s)"
    )
    print(f"  the prompt's first token: {beside:.1f} s beside it, {alone:.1f} s alone: {beside / alone:.2f}x")


def together(model: Any, tokenizer: Any, repeat: int) -> None:
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long essay about {topic}."}], add_generation_prompt=True
        )
        for topic in TOPICS
    ]
    runs = [("mlx-lm batch", 0.0, "off"), ("ChunkedPrefill", DEFAULT_STEP_MS, "off")]
    runs += [("drafting batch", DEFAULT_STEP_MS, "lookup")]  # ChunkedPrefill before worker.speculative's batch
    # One generator each, as the engine keeps one: its cost model has seen a round (the first, not counted) before
    # it decides, as it would have in a running service.
    gens = {name: generator(model, step_ms, speculative) for name, step_ms, speculative in runs}
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    lasts: dict[str, list[float]] = {name: [] for name, _, _ in runs}  # the last prompt's first token
    alone: dict[str, list[float]] = {name: [] for name, _, _ in runs}  # one prompt's first token, nothing else there
    for r in range(repeat + 1):
        for name, gen in gens.items():
            for group in (prompts, prompts[r % len(prompts) : r % len(prompts) + 1]):
                tic = time.perf_counter()
                for p in group:
                    gen.admit(admission(p, 64))
                produced = ended = 0
                firsts: dict[int, float] = {}
                while ended < len(group):
                    step = gen.step()
                    for g in step.generated:
                        firsts.setdefault(g.uid, time.perf_counter() - tic)
                    produced += len(step.generated)
                    ended += sum(g.finish_reason is not None for g in step.generated)
                if r == 0:
                    continue
                if len(group) > 1:
                    rates[name].append(produced / (time.perf_counter() - tic))
                    lasts[name].append(max(firsts.values()))
                else:
                    alone[name].append(max(firsts.values()))
    print(
        f"\n8 prompts admitted at once, 64 tokens each (median of {repeat}, alternating, after one round), and one alone:"
    )
    for name, rate in rates.items():
        print(
            f"  {name:15s} {statistics.median(rate):6.1f} tok/s, the 8th first token at "
            f"{statistics.median(lasts[name]) * 1000:5.0f} ms; one alone, its first token at "
            f"{statistics.median(alone[name]) * 1000:4.0f} ms"
        )
    for name in ("ChunkedPrefill", "drafting batch"):
        ratio = statistics.median(rates[name]) / statistics.median(rates["mlx-lm batch"])
        print(f"  {name} / mlx-lm batch: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="cost,pause,together")
    parser.add_argument("--long-tokens", type=int, default=3000)
    parser.add_argument("--step-ms", type=float, default=DEFAULT_STEP_MS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--speculative", default="off", help="the pause part's decode batch drafts: lookup, off")
    parser.add_argument("--chunks", default="1,16,64,256", help="chunk sizes the cost part times (a GPU: up to 2048)")
    args = parser.parse_args()
    model_dir = builtin_f32()
    model, tokenizer = load(str(model_dir))[:2]
    # The worker's memory settings (MLX's buffer cache, glibc's mmap threshold): what a step's fresh buffers cost.
    Budget.split(default_budget(), weight_sets(model, None), rss() + ALLOWANCE_SLACK).apply()
    parts = args.parts.split(",")
    if "cost" in parts:
        chunks = tuple(int(n) for n in args.chunks.split(","))
        cost(model, tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (300 + max(chunks))), chunks)
    if "pause" in parts:
        logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")  # slow steps, if any
        pause(model, tokenizer, args.long_tokens, args.step_ms, args.speculative)
    if "together" in parts:
        together(model, tokenizer, args.repeat)


if __name__ == "__main__":
    main()
