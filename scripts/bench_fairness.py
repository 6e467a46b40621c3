"""Fairness benchmark (issue 25, "nobody waits behind somebody else's prompt"): mlxq and mlx_lm.server, one at a time.

Both servers get the same float32 copy of the built-in SmolLM2 and the same system OpenBLAS; every request is a
streamed chat completion at temperature 0, timed on the client with httpx (asyncio, one connection per request in
flight). Every prompt opens with a fresh uuid, so no response cache or prefix cache serves any of it beyond the chat
template's opening, and mlxq is also sent `Cache-Control: no-cache, no-store`. mlxq runs with
MLXQ_API_KEYS="keyA,keyB"; every request carries `Authorization: Bearer keyA` (or keyB where said), which
mlx_lm.server ignores, so there the same traffic simply shares one server.

TTFT is send -> the first SSE chunk whose delta has content; a pause is the gap between two consecutive content
chunks of one stream. Long prompts are deterministic filler (seeded sentences) sized with the model's tokenizer so
that the templated prompt is about N tokens; the usage chunk's prompt_tokens is recorded where the server sends it.

For each long-prompt size N (`--long-tokens`, default 1500,3000,6000), `--repeat` times:

* idle: `--idle-repeats` one-line questions alone, one after another (max_tokens 16): the short TTFT idle;
* alone: the ~N-token prompt alone (max_tokens `--long-max-tokens`): the long TTFT alone;
* together: a decoder client starts streaming a long answer (max_tokens `--decoder-max-tokens`); once it has
  streamed 5 chunks the ~N-token prompt is sent, and `--short-delay` (1 s) later the one-line question. The window
  runs from the long prompt's send to the end of both the long and the short request; then the decoder is
  disconnected (both servers stop a disconnected stream). Recorded: the short TTFT during the long prefill (and
  whether it was sent before the long prompt's first token), the long prompt's own TTFT, and the decoder's longest
  pause among gaps that end after the long prompt was sent and start before the window closed (with its median
  gap, for scale, and whether it was still decoding when the window closed).

Medians over repeats stand for each (the worst for the pause). Then the flood: `--idle-repeats` key-B questions
alone (key B's idle TTFT), then `--flood-clients` (8) key-A clients each streaming ~`--flood-tokens`-token prompts
(max_tokens `--flood-max-tokens`), a new one as soon as its last ends, while key B asks a one-line question every
`--flood-interval` s from `--flood-warm` s in, until `--flood-seconds`; when the last key-B question has answered,
the key-A requests still in flight are disconnected.

Targets, per server: short TTFT during the long prefill <= 3x idle; long TTFT with the others <= 1.15x alone; the
decoder's longest pause <= 0.5 s; key B's worst TTFT during the flood <= 3x its idle (its median is shown too).
The fifth target of the issue, 8-client tokens/s no worse, is scripts/bench_concurrency.py's (`--clients 8`).

Prints progress on stderr, a table per server with PASS/MISS against the targets, and one JSON line last; saves a
PNG timeline (`--out`): per request a bar from send to first token (pale) and on to its end (solid), colored by the
client's role, the decoder's chunks as ticks, for the size nearest `--plot-tokens` (3,000) and for the flood.

    .venv/bin/python scripts/bench_fairness.py [--configs mlxq,mlx_lm] [--long-tokens 1500,3000,6000] [--repeat 1] \
        [--flood-clients 8] [--flood-tokens 3000] [--flood-seconds 60] [--flood-interval 5] \
        [--out bench_fairness.png] [--log-dir DIR] [--quick]

`--quick` is a smoke run: one 400-token size, 4 flood clients of 400 tokens for 8 s, shorter answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import running_mlx_lm  # noqa: E402
from bench_agent import builtin_f32  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

KEY_A, KEY_B = "keyA", "keyB"
# Sent to mlxq so its response cache neither answers nor stores; mlx_lm.server ignores it.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
TARGET_SHORT = 3.0  # short TTFT during a long prefill / idle, at most
TARGET_LONG = 1.15  # long TTFT with the others / alone, at most
TARGET_GAP_S = 0.5  # the decoder's longest pause, seconds, at most
TARGET_FLOOD = 3.0  # key B's worst TTFT during key A's flood / key B's idle, at most
DECODER_LEAD_CHUNKS = 5  # the decoder has streamed this many chunks before the long prompt is sent
SHORT_MAX_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "What is two plus three?",
    "Which planet is closest to the sun?",
    "What do bees make?",
]
NOUNS = (
    "river mill bridge garden village market teacher farmer window letter road field forest island winter summer "
    "stone lamp boat harbor tower clock orchard meadow wagon barn kettle ladder rope basket"
).split()
VERBS = "crossed repaired painted counted visited measured opened closed watched carried moved found".split()
ADJECTIVES = "old new small large quiet busy narrow wide early late green grey".split()
ROLE_COLORS = {
    "decoder": "tab:green",
    "long": "tab:blue",
    "short": "tab:red",
    "flood A": "tab:orange",
    "key B": "tab:purple",
}


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- Prompts -----------------------------------------------------------------------------------


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
        out.append(
            f"Note {i + 1}: the {rng.choice(ADJECTIVES)} {noun} near the {other} was {rng.choice(VERBS)} "
            f"on day {rng.randint(1, 365)} by {rng.randint(2, 40)} people."
        )
    return out


class Prompts:
    """Deterministic long prompts sized with the model's tokenizer (the templated prompt, a uuid tag included)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.fillers: dict[int, str] = {}

    def count(self, content: str) -> int:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def long(self, tokens: int, tag: str) -> str:
        if tokens not in self.fillers:
            pool = sentences(tokens, tokens // 8 + 16)
            lo, hi = 1, len(pool)
            while lo < hi:  # the most sentences whose prompt stays within `tokens`
                mid = (lo + hi + 1) // 2
                if self.count(self.wrap(" ".join(pool[:mid]), uuid.uuid4().hex)) <= tokens:
                    lo = mid
                else:
                    hi = mid - 1
            self.fillers[tokens] = " ".join(pool[:lo])
        return self.wrap(self.fillers[tokens], tag)

    @staticmethod
    def wrap(filler: str, tag: str) -> str:
        return f"[{tag}] Read these field notes, then say in one sentence which place they mention most.\n\n{filler}"


def short_prompt(index: int) -> str:
    return f"[{uuid.uuid4().hex}] {QUESTIONS[index % len(QUESTIONS)]} Answer in one short sentence."


def decoder_prompt() -> str:
    return (
        f"[{uuid.uuid4().hex}] Write a very long story about a lighthouse keeper and the ships she guides, "
        f"with many chapters, each describing a different storm in great detail."
    )


# --- Streams -----------------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test: where to send requests and the model id it expects."""

    name: str
    base: str
    model: str


@dataclass
class Stream:
    """One streamed request, times in seconds from its scenario's start."""

    role: str
    key: str
    sent: float
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    error: str | None = None
    cancelled: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def gaps(self, after: float = float("-inf"), before: float = float("inf")) -> list[float]:
        """Gaps between consecutive content chunks that end after `after` and start before `before`."""
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False) if b > after and a < before]

    def bar(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "key": self.key,
            "sent": r3(self.sent),
            "first": r3(self.first),
            "end": r3(self.end),
            "chunks": len(self.chunks),
            "cancelled": self.cancelled,
            **({"error": self.error} if self.error else {}),
        }


async def stream_chat(
    http: httpx.AsyncClient,
    target: Target,
    s: Stream,
    content: str,
    max_tokens: int,
    t0: float,
) -> Stream:
    """Send one streamed chat request and fill `s` in as its chunks arrive; a cancellation marks it cancelled."""
    payload = {
        "model": target.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {s.key}", **NO_CACHE}
    s.sent = time.perf_counter() - t0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter() - t0
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = json.dumps(event["error"])[:300]
                    break
                if event.get("usage"):
                    s.prompt_tokens = event["usage"].get("prompt_tokens")
                choices = event.get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    s.chunks.append(now)
                    if s.first is None:
                        s.first = now
    except asyncio.CancelledError:
        s.cancelled = True
        raise
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    finally:
        s.end = time.perf_counter() - t0
    return s


def start(
    http: httpx.AsyncClient, target: Target, role: str, key: str, content: str, max_tokens: int, t0: float
) -> tuple[Stream, asyncio.Task[Stream]]:
    s = Stream(role, key, time.perf_counter() - t0)
    return s, asyncio.create_task(stream_chat(http, target, s, content, max_tokens, t0))


async def cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def check(s: Stream) -> Stream:
    if s.error:
        raise RuntimeError(f"{s.role} request failed: {s.error}")
    return s


# --- Scenarios ---------------------------------------------------------------------------------


async def idle_shorts(http: httpx.AsyncClient, target: Target, key: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        await asyncio.sleep(0.3)
        s, task = start(http, target, "short", key, short_prompt(i), SHORT_MAX_TOKENS, time.perf_counter())
        check(await task)
        assert s.ttft is not None, "no content streamed"
        out.append(s.ttft)
    return out


async def long_alone(http: httpx.AsyncClient, target: Target, prompts: Prompts, tokens: int, args) -> Stream:
    await asyncio.sleep(1)
    content = prompts.long(tokens, uuid.uuid4().hex)
    _, task = start(http, target, "long", KEY_A, content, args.long_max_tokens, time.perf_counter())
    return check(await task)


async def together(http: httpx.AsyncClient, target: Target, prompts: Prompts, tokens: int, args) -> dict[str, Any]:
    """The decoder streaming, then the long prompt, then (`short_delay` later) the short question."""
    await asyncio.sleep(1)
    content = prompts.long(tokens, uuid.uuid4().hex)  # built before the clock starts
    t0 = time.perf_counter()
    dec, dec_task = start(http, target, "decoder", KEY_A, decoder_prompt(), args.decoder_max_tokens, t0)
    while len(dec.chunks) < DECODER_LEAD_CHUNKS and not dec_task.done():
        await asyncio.sleep(0.01)
    if dec_task.done():
        check(dec_task.result())
        raise RuntimeError(f"the decoder ended after {len(dec.chunks)} chunks, before the long prompt was sent")
    long, long_task = start(http, target, "long", KEY_A, content, args.long_max_tokens, t0)
    await asyncio.sleep(args.short_delay)
    short, short_task = start(http, target, "short", KEY_A, short_prompt(random.randrange(100)), SHORT_MAX_TOKENS, t0)
    await asyncio.gather(long_task, short_task)
    window_end = time.perf_counter() - t0
    covered = not dec_task.done()
    await cancel([dec_task])
    for s in (long, short):
        check(s)
    if dec.error:
        raise RuntimeError(f"decoder failed: {dec.error}")
    gaps = dec.gaps(after=long.sent, before=window_end)
    before = dec.gaps(before=long.sent)
    # Where the longest pause fell, from the long prompt's send (its first token came at `long_ttft`): a step of its
    # prefill, its join to the batch, its end.
    pauses = [(b - a, a - long.sent) for a, b in zip(dec.chunks, dec.chunks[1:], strict=False) if b > long.sent]
    pauses = [p for p in pauses if p[1] + long.sent < window_end]
    # The gaps either side of the longest: a long step is flanked by steps of its usual length, where a chunk that
    # reached the client late (its process kept off the CPU) is followed by a short one.
    at = gaps.index(max(gaps)) if gaps else None
    around = [round(g, 3) for g in gaps[max(at - 1, 0) : at + 2]] if at is not None else []
    return {
        "short_ttft": short.ttft,
        "long_ttft": long.ttft,
        "short_during_prefill": long.first is None or short.sent < long.first,
        "max_gap": max(gaps) if gaps else None,
        "max_gap_at": max(pauses)[1] if pauses else None,
        "gaps_over_target": sum(g > TARGET_GAP_S for g in gaps),
        "decoder_median_gap": median(before),
        "decoder_median_gap_during": median(gaps),
        "max_gap_around": around,
        "decoder_covered": covered,
        "long_prompt_tokens": long.prompt_tokens,
        "timeline": [dec, long, short],
    }


async def flood(http: httpx.AsyncClient, target: Target, prompts: Prompts, args) -> dict[str, Any]:
    idle = await idle_shorts(http, target, KEY_B, args.idle_repeats)
    await asyncio.sleep(1)
    prompts.long(args.flood_tokens, "")  # size the filler before the clock starts
    t0 = time.perf_counter()
    streams: list[Stream] = []
    running: dict[int, asyncio.Task[Stream]] = {}
    stop = asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            s, task = start(
                http,
                target,
                "flood A",
                KEY_A,
                prompts.long(args.flood_tokens, uuid.uuid4().hex),
                args.flood_max_tokens,
                t0,
            )
            streams.append(s)
            running[i] = task
            await task
            if s.error:
                say(f"    flood A request failed: {s.error}")
                await asyncio.sleep(0.5)

    clients = [asyncio.create_task(client(i)) for i in range(args.flood_clients)]
    probes: list[tuple[Stream, asyncio.Task[Stream]]] = []
    at = args.flood_warm
    while at < args.flood_seconds:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        probes.append(start(http, target, "key B", KEY_B, short_prompt(len(probes)), SHORT_MAX_TOKENS, t0))
        at += args.flood_interval
    await asyncio.gather(*(task for _, task in probes))
    stop.set()
    await cancel([*running.values(), *clients])
    b = [s for s, _ in probes]
    # A question still unanswered at --timeout counts as that long (a lower bound), so a server that holds key B
    # behind the flood is measured rather than ending the run.
    b_ttft = [s.ttft if s.ttft is not None else args.timeout for s in b if s.ttft is not None or s.error]
    done = [s for s in streams if not s.cancelled and not s.error]
    a_ttft = [s.ttft for s in done if s.ttft is not None]
    return {
        "key_b_idle_ttft": median(idle),
        "key_b_ttft": b_ttft,
        "key_b_p50": median(b_ttft),
        "key_b_max": max(b_ttft) if b_ttft else None,
        "key_b_timeouts": sum(s.ttft is None and bool(s.error) for s in b),
        "key_a_done": len(done),
        "key_a_cancelled": sum(s.cancelled for s in streams),
        "key_a_errors": sum(bool(s.error) for s in streams),
        "key_a_ttft_p50": median(a_ttft),
        "key_a_prompt_tokens": next((s.prompt_tokens for s in done if s.prompt_tokens), None),
        "timeline": [*streams, *b],
    }


async def warm_up(http: httpx.AsyncClient, target: Target, prompts: Prompts) -> None:
    """A short request and a 512-token one: weights loaded, kernels compiled, pools filled."""
    await idle_shorts(http, target, KEY_A, 1)
    _, task = start(http, target, "long", KEY_A, prompts.long(512, uuid.uuid4().hex), 4, time.perf_counter())
    check(await task)


async def run_target(target: Target, prompts: Prompts, args) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.flood_clients + 32, max_keepalive_connections=8)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=target.base, limits=limits, timeout=timeout) as http:
        say(f"{target.name}: warming up")
        await warm_up(http, target, prompts)
        sizes: dict[int, dict[str, Any]] = {}
        for tokens in args.sizes:
            idle: list[float] = []
            alone: list[Stream] = []
            runs: list[dict[str, Any]] = []
            for attempt in range(args.repeat):
                idle += await idle_shorts(http, target, KEY_A, args.idle_repeats)
                alone.append(await long_alone(http, target, prompts, tokens, args))
                runs.append(await together(http, target, prompts, tokens, args))
                run = runs[-1]
                say(
                    f"  {target.name} ~{tokens} tokens #{attempt + 1}: short idle {idle[-1]:.3f}s, "
                    f"during {run['short_ttft']:.3f}s; long alone {alone[-1].ttft:.3f}s, "
                    f"with others {run['long_ttft']:.3f}s; decoder max gap {run['max_gap'] or 0:.3f}s"
                    f" at {run['max_gap_at'] or 0:.2f}s ({run['gaps_over_target']} over {TARGET_GAP_S} s; with its"
                    f" neighbours {run['max_gap_around']}, median {run['decoder_median_gap_during'] or 0:.3f}s)"
                    f"{'' if run['decoder_covered'] else ' (decoder ended inside the window)'}"
                    f"{'' if run['short_during_prefill'] else ' (short sent after the long first token)'}"
                )
            sizes[tokens] = summarise_size(idle, alone, runs)
        say(f"  {target.name}: flood, {args.flood_clients} key-A clients of ~{args.flood_tokens} tokens")
        fl = await flood(http, target, prompts, args)
        say(
            f"  {target.name} flood: key B idle {seconds(fl['key_b_idle_ttft'])}, p50 {seconds(fl['key_b_p50'])}, "
            f"max {seconds(fl['key_b_max'])} over {len(fl['key_b_ttft'])}; key A {fl['key_a_done']} done"
        )
    return {"sizes": sizes, "flood": fl}


def seconds(value: float | None) -> str:
    """A figure for the progress lines: none where nothing was measured (a flood too short for key B to ask)."""
    return "-" if value is None else f"{value:.3f}s"


def summarise_size(idle: list[float], alone: list[Stream], runs: list[dict[str, Any]]) -> dict[str, Any]:
    short_idle = median(idle)
    short_during = median([r["short_ttft"] for r in runs])
    long_alone_s = median([s.ttft for s in alone if s.ttft is not None])
    long_with = median([r["long_ttft"] for r in runs])
    gaps = [r["max_gap"] for r in runs if r["max_gap"] is not None]
    return {
        "prompt_tokens": runs[0]["long_prompt_tokens"] or alone[0].prompt_tokens,
        "short_ttft_idle": short_idle,
        "short_ttft_during": short_during,
        "short_ratio": ratio(short_during, short_idle),
        "short_during_prefill": all(r["short_during_prefill"] for r in runs),
        "decoder_max_gap": max(gaps) if gaps else None,
        "decoder_median_gap": median([r["decoder_median_gap"] for r in runs if r["decoder_median_gap"] is not None]),
        "decoder_covered": all(r["decoder_covered"] for r in runs),
        "long_ttft_alone": long_alone_s,
        "long_ttft_with_others": long_with,
        "long_ratio": ratio(long_with, long_alone_s),
        "timeline": runs[0]["timeline"],
    }


# --- Servers -----------------------------------------------------------------------------------


@contextmanager
def mlxq_server(model_dir: Path, run_dir: Path) -> Iterator[Target]:
    env = {
        "MLXQ_DATA_DIR": str(run_dir / "mlxq-data"),
        "MLXQ_MODEL": str(model_dir),
        "MLXQ_MODEL_NAME": BUILTIN_MODEL,
        "MLXQ_API_KEYS": f"{KEY_A},{KEY_B}",
    }
    log_dir = run_dir / "logs-mlxq"
    log_dir.mkdir(parents=True, exist_ok=True)
    svc = Service(env, log_dir).start()
    try:
        yield Target("mlxq", svc.base, BUILTIN_MODEL)
    except BaseException:
        say(f"mlxq logs:\n{svc.logs()}")
        raise
    finally:
        svc.stop()


@contextmanager
def mlx_lm_server(model_dir: Path, run_dir: Path, max_tokens: int) -> Iterator[Target]:
    with running_mlx_lm(model_dir, run_dir / "mlx_lm.log", max_tokens) as (proc, base):
        yield Target("mlx_lm", base, str(model_dir))


# --- Report ------------------------------------------------------------------------------------


def verdict(value: float | None, limit: float) -> str:
    return "-" if value is None else ("PASS" if value <= limit else "MISS")


def secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(name: str, result: dict[str, Any], args) -> None:
    print(
        f"\n{name}: one client streams a ~N-token prompt; {args.short_delay:g} s later another asks a one-line "
        f"question; a third streams a long answer throughout (median of {args.repeat}, worst pause)"
    )
    head = [
        "N",
        "prompt",
        "short idle",
        "short during",
        f"x idle (<={TARGET_SHORT:g})",
        f"max pause (<={TARGET_GAP_S:g}s)",
        "long alone",
        "long w/ others",
        f"x alone (<={TARGET_LONG:g})",
    ]
    rows = [head]
    notes = []
    for tokens, s in result["sizes"].items():
        rows.append(
            [
                str(tokens),
                str(s["prompt_tokens"] or "-"),
                secs(s["short_ttft_idle"]),
                secs(s["short_ttft_during"]),
                f"{times(s['short_ratio'])} {verdict(s['short_ratio'], TARGET_SHORT)}",
                f"{secs(s['decoder_max_gap'])} {verdict(s['decoder_max_gap'], TARGET_GAP_S)}",
                secs(s["long_ttft_alone"]),
                secs(s["long_ttft_with_others"]),
                f"{times(s['long_ratio'])} {verdict(s['long_ratio'], TARGET_LONG)}",
            ]
        )
        if not s["decoder_covered"]:
            notes.append(f"N={tokens}: the decoder ended inside the window; raise --decoder-max-tokens")
        if not s["short_during_prefill"]:
            notes.append(f"N={tokens}: the short question was sent after the long prompt's first token")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    for note in notes:
        print(f"  note: {note}")
    fl = result["flood"]
    worst = ratio(fl["key_b_max"], fl["key_b_idle_ttft"])
    print(
        f"flood: key A {args.flood_clients} clients x ~{args.flood_tokens} tokens for {args.flood_seconds:g} s; key B "
        f"one question every {args.flood_interval:g} s ({len(fl['key_b_ttft'])} sent)\n"
        f"  key B TTFT idle {secs(fl['key_b_idle_ttft'])}, p50 {secs(fl['key_b_p50'])} "
        f"({times(ratio(fl['key_b_p50'], fl['key_b_idle_ttft']))}), max {secs(fl['key_b_max'])} "
        f"({times(worst)} <= {TARGET_FLOOD:g}x {verdict(worst, TARGET_FLOOD)}); key A {fl['key_a_done']} done, "
        f"{fl['key_a_cancelled']} cut at the end, {fl['key_a_errors']} errors, TTFT p50 {secs(fl['key_a_ttft_p50'])}"
    )


def draw(ax, streams: list[Stream], title: str) -> None:
    for row, s in enumerate(streams):
        color = ROLE_COLORS.get(s.role, "grey")
        end = s.end if s.end is not None else s.sent
        first = s.first if s.first is not None else end
        ax.barh(row, first - s.sent, left=s.sent, color=color, alpha=0.3, height=0.7)
        ax.barh(row, end - first, left=first, color=color, alpha=0.9, height=0.7)
        if s.role == "decoder":
            ax.plot(s.chunks, [row] * len(s.chunks), "|", color="black", markersize=6, alpha=0.6)
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (pale: send to first token; solid: streaming)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def plot(out: Path, results: dict[str, dict[str, Any]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tokens = min(args.sizes, key=lambda n: abs(n - args.plot_tokens))
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 3.2 * len(results)), squeeze=False)
    for row, (name, result) in enumerate(results.items()):
        draw(axes[row][0], result["sizes"][tokens]["timeline"], f"{name}: ~{tokens}-token prompt, then a question")
        fl = result["flood"]["timeline"]
        draw(axes[row][1], fl, f"{name}: key A {args.flood_clients} x ~{args.flood_tokens} tokens, key B questions")
    handles = [Patch(color=c, label=role) for role, c in ROLE_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{BUILTIN_MODEL} float32, temperature 0, streamed", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=120)
    say(f"plot saved to {out}")


def to_json(results: dict[str, dict[str, Any]], args) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "fairness",
        "model": BUILTIN_MODEL,
        "targets": {
            "short_ratio": TARGET_SHORT,
            "long_ratio": TARGET_LONG,
            "max_pause_s": TARGET_GAP_S,
            "flood_ratio": TARGET_FLOOD,
            "throughput": "scripts/bench_concurrency.py --clients 8",
        },
        "short_delay_s": args.short_delay,
        "repeat": args.repeat,
    }
    for name, result in results.items():
        sizes = {}
        for tokens, s in result["sizes"].items():
            row = {k: r3(v) if isinstance(v, float) else v for k, v in s.items() if k != "timeline"}
            row["pass"] = {
                "short": verdict(s["short_ratio"], TARGET_SHORT),
                "pause": verdict(s["decoder_max_gap"], TARGET_GAP_S),
                "long": verdict(s["long_ratio"], TARGET_LONG),
            }
            row["timeline"] = [st.bar() for st in s["timeline"]]
            sizes[str(tokens)] = row
        fl = result["flood"]
        worst = ratio(fl["key_b_max"], fl["key_b_idle_ttft"])
        flood_row = {
            k: ([r3(x) for x in v] if isinstance(v, list) else r3(v) if isinstance(v, float) else v)
            for k, v in fl.items()
            if k != "timeline"
        }
        flood_row.update(
            clients=args.flood_clients,
            tokens=args.flood_tokens,
            seconds=args.flood_seconds,
            p50_ratio=ratio(fl["key_b_p50"], fl["key_b_idle_ttft"]),
            max_ratio=worst,
            verdict=verdict(worst, TARGET_FLOOD),
        )
        out[name] = {"sizes": sizes, "flood": flood_row}
    return out


# --- Main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", default="mlxq,mlx_lm", help="servers, one at a time: mlxq, mlx_lm")
    parser.add_argument("--long-tokens", default="1500,3000,6000", help="comma-separated long-prompt sizes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (medians; the worst pause)")
    parser.add_argument("--idle-repeats", type=int, default=3, help="idle short questions per run")
    parser.add_argument("--short-delay", type=float, default=1.0, help="seconds from the long prompt to the question")
    parser.add_argument("--long-max-tokens", type=int, default=32)
    parser.add_argument("--decoder-max-tokens", type=int, default=2048)
    parser.add_argument("--flood-clients", type=int, default=8)
    parser.add_argument("--flood-tokens", type=int, default=3000)
    parser.add_argument("--flood-max-tokens", type=int, default=32)
    parser.add_argument("--flood-seconds", type=float, default=60.0)
    parser.add_argument("--flood-interval", type=float, default=5.0, help="seconds between key B's questions")
    parser.add_argument("--flood-warm", type=float, default=2.0, help="seconds into the flood of key B's first")
    parser.add_argument("--plot-tokens", type=int, default=3000, help="the size whose timeline is plotted")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    parser.add_argument("--out", default="bench_fairness.png", help="PNG timeline")
    parser.add_argument("--log-dir", help="keep server logs and data here instead of a temporary directory")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small size, short flood")
    args = parser.parse_args()
    if args.quick:
        args.long_tokens, args.idle_repeats, args.decoder_max_tokens = "400", 2, 512
        args.long_max_tokens = args.flood_max_tokens = 8
        args.flood_clients, args.flood_tokens, args.flood_seconds, args.flood_interval = 4, 400, 8.0, 2.0
    args.sizes = [int(n) for n in args.long_tokens.split(",")]
    args.config_list = args.configs.split(",")
    unknown = set(args.config_list) - {"mlxq", "mlx_lm"}
    if unknown:
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    args = parse_args()
    model_dir = builtin_f32()
    prompts = Prompts(model_dir)
    for tokens in sorted({*args.sizes, args.flood_tokens}):
        say(f"~{tokens}-token prompt: {prompts.count(prompts.long(tokens, uuid.uuid4().hex))} tokens templated")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.log_dir or tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in args.config_list:
            server = (
                mlxq_server(model_dir, run_dir)
                if name == "mlxq"
                else mlx_lm_server(model_dir, run_dir, args.decoder_max_tokens)
            )
            with server as target:
                results[name] = asyncio.run(run_target(target, prompts, args))
    for name, result in results.items():
        print_table(name, result, args)
    plot(Path(args.out), results, args)
    print(json.dumps(to_json(results, args)))


if __name__ == "__main__":
    main()
