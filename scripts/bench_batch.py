"""Batch benchmark: N prompts as one OpenAI batch beside the same number sent one by one, plus interactive TTFT.

One mlxq service (embedded default: SQLite database and broker, on a fresh data dir so nothing is cached)
runs the model, and everything goes through the official `openai` client. Per round:

* Idle TTFT: a few streamed chat requests (max_tokens 8, distinct prompts) on the idle service, one at a
  time: seconds to the first content chunk.
* One by one: N distinct essay prompts (temperature 0, `--max-tokens`) sent to /v1/chat/completions in
  turn, each waiting for its answer. Wall time, generated tokens (usage.completion_tokens), tokens/s.
* Batch: N other prompts of the same shape uploaded as a JSONL file (files.create) and run as one batch
  (batches.create), polled (batches.retrieve) every 0.25 s until completed. Wall time from the upload to
  `completed`, generated tokens summed from the output file's usage, tokens/s. While it runs, a streamed
  interactive request goes every `--ttft-gap` seconds (TTFT during the batch) and /health's `batch` block
  is sampled (sequences decoding together, waiting for room, preempted). Each line's finish time and
  tokens come from its job row afterwards, for the plot.

The arms use different prompt sets (a tag per round, arm and line; the same template and topics), so the
response cache never answers one arm from the other, and they take turns going first round by round, so
drift in a shared machine's load hits both alike. The few interactive probes run during the batch only;
their tokens are not counted.

Prints progress on stderr and one JSON summary on stdout (per round and medians, with the targets: batch
tokens/s >= 3x one by one, TTFT during the batch <= 2x idle), and saves a PNG of tokens/s over the
batch's life (the round with the median speedup).

    .venv/bin/python scripts/bench_batch.py [--prompts 64] [--max-tokens 64] [--repeat 1] \
        [--plot bench_batch.png] [--ttft-probes 6] [--ttft-gap 2] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import ms  # noqa: E402
from bench_concurrency import TOPICS, essay_prompt  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402
from mlxq.states import BATCH_FINAL, BatchStatus, CacheOutcome, JobStatus  # noqa: E402

ENDPOINT = "/v1/chat/completions"
TARGET_SPEEDUP = 3.0  # batch tokens/s over one-by-one tokens/s, at least
TARGET_TTFT_RATIO = 2.0  # interactive TTFT during the batch over idle, at most
POLL_S = 0.25
HEALTH_EVERY_S = 1.0  # /health's batch block is refreshed by the worker's heartbeat (2 s) anyway
FINAL = tuple(BATCH_FINAL)


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def messages(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def prompt_set(run: str, round_: int, arm: str, n: int) -> list[str]:
    # One tag per line: the topics repeat every len(TOPICS) lines, the tag keeps every prompt distinct, and
    # both arms' tags have the same length, so the two sets have the same shape.
    return [essay_prompt(f"{run}-{round_}{arm}-{i:03d}", i) for i in range(n)]


# --- Measurements ------------------------------------------------------------------------------


@dataclass
class Arm:
    """One arm of a round: per-line generated tokens and when each line finished (s since the arm began)."""

    name: str
    wall_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    finished: list[tuple[float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cache_hits: int = 0

    @property
    def tok_s(self) -> float:
        return sum(self.tokens) / self.wall_s if self.wall_s else 0.0


@dataclass
class Probe:
    """An interactive streamed request: when it was sent (s since the batch began) and its TTFT (s)."""

    sent: float
    ttft: float


@dataclass
class BatchRun(Arm):
    batch_id: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)  # polls: t, completed, /health batch block
    lines: list[tuple[float, float, int]] = field(default_factory=list)  # (started, finished, tokens) per line
    probes: list[Probe] = field(default_factory=list)  # interactive requests during the batch


def ttft(client: openai.OpenAI, content: str) -> float | None:
    """Seconds to the first content chunk of a streamed chat request (max_tokens 8), read to its end."""
    start = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=messages(content), temperature=0, max_tokens=8, stream=True
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first


def idle_ttft(client: openai.OpenAI, run: str, round_: int, probes: int) -> list[float]:
    out = []
    for i in range(probes):
        time.sleep(0.5)  # let the previous request's BLAS threads stop spinning
        value = ttft(client, interactive_prompt(f"{run}-{round_}idle-{i}", i))
        if value is not None:
            out.append(value)
    return out


def interactive_prompt(tag: str, index: int) -> str:
    return f"[{tag}] In one sentence, what is the most surprising fact about {TOPICS[index % len(TOPICS)]}?"


def one_by_one(client: openai.OpenAI, prompts: list[str], max_tokens: int) -> Arm:
    arm = Arm("one_by_one")
    start = time.perf_counter()
    for content in prompts:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=BUILTIN_MODEL, messages=messages(content), temperature=0, max_tokens=max_tokens
            )
        except openai.APIError as exc:
            arm.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        arm.cache_hits += raw.headers.get("x-cache") == CacheOutcome.HIT
        tokens = raw.parse().usage.completion_tokens
        arm.tokens.append(tokens)
        arm.finished.append((time.perf_counter() - start, tokens))
    arm.wall_s = time.perf_counter() - start
    return arm


def batch(
    client: openai.OpenAI,
    base: str,
    db_url: str,
    prompts: list[str],
    max_tokens: int,
    args: argparse.Namespace,
    tag: str,
) -> BatchRun:
    """Upload, create, poll to the end (sampling progress and /health, probing TTFT), read the output."""
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": ENDPOINT,
            "body": {"model": BUILTIN_MODEL, "messages": messages(p), "temperature": 0, "max_tokens": max_tokens},
        }
        for i, p in enumerate(prompts)
    ]
    content = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    run = BatchRun("batch")
    done = threading.Event()

    def probe_loop(began: float) -> None:
        # Interactive requests spaced through the batch, each on a batch that is still running.
        probe_client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=args.timeout)
        for i in range(args.ttft_probes):
            if done.wait(args.ttft_gap):
                return
            sent = time.perf_counter() - began
            value = ttft(probe_client, interactive_prompt(f"{tag}-during-{i}", i))
            if value is not None:
                run.probes.append(Probe(sent, value))

    t0 = time.time()
    start = time.perf_counter()
    file = client.files.create(file=("prompts.jsonl", content, "application/jsonl"), purpose="batch")
    job = client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h")
    run.batch_id = job.id
    prober = threading.Thread(target=probe_loop, args=(start,), daemon=True)
    prober.start()
    health_at = 0.0
    with httpx.Client(base_url=base, timeout=10) as http:
        while job.status not in FINAL:
            time.sleep(POLL_S)
            job = client.batches.retrieve(job.id)
            now = time.perf_counter() - start
            sample: dict[str, Any] = {"t": now, "completed": job.request_counts.completed if job.request_counts else 0}
            if now - health_at >= HEALTH_EVERY_S:
                health_at = now
                sample["batch"] = http.get("/health").json().get("batch")
            run.samples.append(sample)
            if now > args.timeout:
                raise TimeoutError(f"batch {job.id} still {job.status} after {now:.0f} s")
    run.wall_s = time.perf_counter() - start
    done.set()
    prober.join()
    # A probe counts as "during the batch" when its first token came before the batch was seen completed.
    run.probes = [p for p in run.probes if p.sent + p.ttft <= run.wall_s]
    if job.status != BatchStatus.COMPLETED:
        raise RuntimeError(f"batch {job.id} ended {job.status}: {job.errors}")

    if job.output_file_id:
        for raw in client.files.content(job.output_file_id).text.splitlines():
            entry = json.loads(raw)
            run.tokens.append(entry["response"]["body"]["usage"]["completion_tokens"])
    if job.error_file_id:
        run.errors += client.files.content(job.error_file_id).text.splitlines()
    run.lines = line_times(db_url, job.id, t0)
    run.finished = [(end, tokens) for _, end, tokens in run.lines]
    return run


def line_times(db_url: str, batch_id: str, t0: float) -> list[tuple[float, float, int]]:
    """(started, finished (s since the batch began), generated tokens) of each finished line, from its job
    row: the output file is composed once at the end, so it has no per-line times. `started` is when a
    worker thread took the job, which may be before the engine had room for it."""
    from sqlalchemy import create_engine, text

    sql = create_engine(db_url)
    with sql.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT started_at, finished_at, completion_tokens FROM jobs WHERE batch_id = :b "
                f"AND status = '{JobStatus.SUCCEEDED}' ORDER BY finished_at"
            ),
            {"b": batch_id},
        ).all()
    sql.dispose()
    return [(started - t0, finished - t0, tokens or 0) for started, finished, tokens in rows]


# --- Rounds ------------------------------------------------------------------------------------


def warm_up(client: openai.OpenAI, base: str, db_url: str, args: argparse.Namespace) -> None:
    """One chat request and one small batch: first-run costs (kernels, thread pools, batch paths) paid here."""
    client.chat.completions.create(
        model=BUILTIN_MODEL, messages=messages("[warm-up] Say hello."), temperature=0, max_tokens=8
    )
    quick = argparse.Namespace(**{**vars(args), "ttft_probes": 0})
    batch(client, base, db_url, prompt_set("warm-up", 0, "b", 4), 8, quick, "warm-up")


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def round_summary(oneby1: Arm, run: BatchRun, idle: list[float], order: list[str], max_tokens: int) -> dict:
    idle_ms = median_of(idle)
    during_ms = median_of([p.ttft for p in run.probes])
    active = [s["batch"]["active"] for s in run.samples if s.get("batch")]
    waiting = [s["batch"]["waiting"] for s in run.samples if s.get("batch")]
    preempted = [s["batch"]["preempted"] for s in run.samples if s.get("batch")]
    return {
        "order": order,
        "oneby1_wall_s": round(oneby1.wall_s, 2),
        "oneby1_tokens": sum(oneby1.tokens),
        "oneby1_tok_s": round(oneby1.tok_s, 1),
        "batch_wall_s": round(run.wall_s, 2),
        "batch_tokens": sum(run.tokens),
        "batch_tok_s": round(run.tok_s, 1),
        "speedup": round(run.tok_s / oneby1.tok_s, 2) if oneby1.tok_s else None,
        "ttft_idle_ms": ms(idle_ms) if idle_ms is not None else None,
        "ttft_during_batch_ms": ms(during_ms) if during_ms is not None else None,
        "ttft_ratio": round(during_ms / idle_ms, 2) if idle_ms and during_ms else None,
        "ttft_idle_all_ms": [ms(v) for v in idle],
        "ttft_during_batch_all_ms": [ms(p.ttft) for p in run.probes],
        # Lines that stopped before max_tokens: a different mix between the arms would skew tokens/s.
        "short_lines": {
            "oneby1": sum(t < max_tokens for t in oneby1.tokens),
            "batch": sum(t < max_tokens for t in run.tokens),
        },
        "errors": {"oneby1": len(oneby1.errors), "batch": len(run.errors)},
        "cache_hits_oneby1": oneby1.cache_hits,
        # /health's batch block while the batch ran (refreshed by the worker's 2 s heartbeat).
        "health_batch": {
            "active_max": max(active, default=None),
            "active_median": median_of(active),
            "waiting_max": max(waiting, default=None),
            "preempted": (preempted[-1] - preempted[0]) if preempted else None,
            "samples": len(active),
        },
    }


def run_rounds(
    client: openai.OpenAI,
    base: str,
    db_url: str,
    args: argparse.Namespace,
) -> tuple[list[dict], list[tuple[Arm, BatchRun]]]:
    run_id = uuid.uuid4().hex[:6]
    summaries, traces = [], []
    for r in range(args.repeat):
        time.sleep(1)
        idle = idle_ttft(client, run_id, r, args.ttft_probes)
        say(f"round {r}: idle TTFT {[round(ms(v)) for v in idle]} ms")
        order = ["oneby1", "batch"] if r % 2 == 0 else ["batch", "oneby1"]
        oneby1: Arm | None = None
        run: BatchRun | None = None
        for arm in order:
            time.sleep(1)  # let the previous arm's BLAS threads stop spinning
            if arm == "oneby1":
                oneby1 = one_by_one(client, prompt_set(run_id, r, "o", args.prompts), args.max_tokens)
                say(
                    f"round {r}: one by one {oneby1.wall_s:.1f} s, {sum(oneby1.tokens)} tokens, "
                    f"{oneby1.tok_s:.1f} tok/s, {len(oneby1.errors)} errors, {oneby1.cache_hits} cache hits"
                )
            else:
                run = batch(
                    client,
                    base,
                    db_url,
                    prompt_set(run_id, r, "b", args.prompts),
                    args.max_tokens,
                    args,
                    f"{run_id}-{r}",
                )
                active = [s["batch"]["active"] for s in run.samples if s.get("batch")]
                say(
                    f"round {r}: batch {run.wall_s:.1f} s, {sum(run.tokens)} tokens, {run.tok_s:.1f} tok/s, "
                    f"{len(run.errors)} error lines; /health batch.active samples {active}; "
                    f"TTFT during {[round(ms(p.ttft)) for p in run.probes]} ms"
                )
        assert oneby1 is not None and run is not None
        summary = round_summary(oneby1, run, idle, order, args.max_tokens)
        say(f"round {r}: speedup {summary['speedup']}x, TTFT ratio {summary['ttft_ratio']}")
        summaries.append(summary)
        traces.append((oneby1, run))
    return summaries, traces


# --- Report ------------------------------------------------------------------------------------


def medians(rounds: list[dict]) -> dict[str, float | None]:
    keys = (
        "oneby1_wall_s",
        "oneby1_tok_s",
        "batch_wall_s",
        "batch_tok_s",
        "speedup",
        "ttft_idle_ms",
        "ttft_during_batch_ms",
        "ttft_ratio",
    )
    out = {}
    for key in keys:
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    return out


def targets(summary: dict[str, float | None]) -> dict[str, dict]:
    speedup, ratio = summary["speedup"], summary["ttft_ratio"]
    return {
        "speedup": {
            "target": f">= {TARGET_SPEEDUP:g}x",
            "value": speedup,
            "met": speedup is not None and speedup >= TARGET_SPEEDUP,
        },
        "ttft_ratio": {
            "target": f"<= {TARGET_TTFT_RATIO:g}x",
            "value": ratio,
            "met": ratio is not None and ratio <= TARGET_TTFT_RATIO,
        },
    }


def plot(out: Path, oneby1: Arm, run: BatchRun, idle: list[float], args: argparse.Namespace) -> None:
    """Top: the batch's generated tokens/s per bin (lines' tokens counted when they finish) and cumulative
    tokens, beside the one-by-one rate. Bottom: /health's batch.active / waiting and the TTFT probes."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 2])
    bin_s = args.bin_s
    bins = max(1, int(-(-run.wall_s // bin_s)))
    edges = [min(i * bin_s, run.wall_s) for i in range(bins + 1)]
    done_in = [0.0] * bins  # tokens of the lines that finished in each bin
    spread = [0.0] * bins  # each line's tokens spread evenly over its job's run (started -> finished)
    for started, finished, tokens in run.lines:
        done_in[min(bins - 1, max(0, int(finished // bin_s)))] += tokens
        span = max(finished - started, 1e-9)
        for i in range(bins):
            overlap = min(finished, edges[i + 1]) - max(started, edges[i])
            if overlap > 0:
                spread[i] += tokens * overlap / span
    widths = [max(edges[i + 1] - edges[i], 1e-9) for i in range(bins)]
    top.stairs(
        [v / w for v, w in zip(done_in, widths, strict=True)],
        edges,
        fill=True,
        alpha=0.3,
        color="C0",
        label=f"batch: tokens of lines finished per {bin_s:g} s",
    )
    top.stairs(
        [v / w for v, w in zip(spread, widths, strict=True)],
        edges,
        color="C4",
        lw=1.5,
        label="batch: each line's tokens spread over its run",
    )
    top.axhline(run.tok_s, color="C0", ls="--", label=f"batch mean {run.tok_s:.0f} tok/s")
    top.axhline(oneby1.tok_s, color="C1", ls="--", label=f"one by one mean {oneby1.tok_s:.0f} tok/s")
    top.axhline(TARGET_SPEEDUP * oneby1.tok_s, color="C1", ls=":", label=f"target {TARGET_SPEEDUP:g}x one by one")
    top.set_ylabel("generated tokens/s")
    top.set_ylim(bottom=0)
    cumulative = top.twinx()
    total, cx, cy = 0, [0.0], [0]
    for t, tokens in run.finished:
        total += tokens
        cx.append(t)
        cy.append(total)
    cumulative.step(cx, cy, where="post", color="C2", lw=1, label="batch cumulative tokens")
    cumulative.set_ylabel("cumulative tokens", color="C2")
    cumulative.set_ylim(bottom=0)
    handles = top.get_legend_handles_labels()[0] + cumulative.get_legend_handles_labels()[0]
    top.legend(handles=handles, fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    top.set_title(
        f"{BUILTIN_MODEL}: {args.prompts} prompts x max_tokens {args.max_tokens}, batch vs one by one "
        f"({run.tok_s / oneby1.tok_s:.2f}x)"
        if oneby1.tok_s
        else BUILTIN_MODEL,
        fontsize=10,
    )

    health = [(s["t"], s["batch"]) for s in run.samples if s.get("batch")]
    if health:
        bottom.step(
            [t for t, _ in health], [b["active"] for t, b in health], where="post", label="/health batch.active"
        )
        bottom.step([t for t, _ in health], [b["waiting"] for t, b in health], where="post", label="batch.waiting")
    bottom.set_ylabel("sequences")
    bottom.set_xlabel("seconds since the batch was submitted")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    probes = bottom.twinx()
    if run.probes:
        probes.scatter(
            [p.sent for p in run.probes],
            [ms(p.ttft) for p in run.probes],
            color="C3",
            marker="x",
            label="interactive TTFT during the batch",
        )
    if idle:
        idle_ms = ms(statistics.median(idle))
        probes.axhline(idle_ms, color="C3", ls="--", lw=1, label=f"idle TTFT {idle_ms:.0f} ms")
        probes.axhline(
            TARGET_TTFT_RATIO * idle_ms, color="C3", ls=":", lw=1, label=f"target {TARGET_TTFT_RATIO:g}x idle"
        )
    probes.set_ylabel("TTFT ms", color="C3")
    probes.set_ylim(bottom=0)
    handles = bottom.get_legend_handles_labels()[0] + probes.get_legend_handles_labels()[0]
    bottom.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    say(f"plot saved to {out}")


# --- Main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per arm")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="rounds, the arms' order flipping each; medians kept")
    parser.add_argument("--plot", default="bench_batch.png", help="PNG of tokens/s over the batch's life")
    parser.add_argument("--bin-s", type=float, default=2.0, help="bin width of the plot's tokens/s, seconds")
    parser.add_argument("--ttft-probes", type=int, default=6, help="interactive requests idle, and at most during")
    parser.add_argument("--ttft-gap", type=float, default=2.0, help="seconds between interactive requests in a batch")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-request and per-batch timeout, seconds")
    parser.add_argument("--model", default=str(ROOT / ".data" / "models" / BUILTIN_MODEL))
    parser.add_argument("--log-dir", help="keep the service's logs and data here instead of a temporary directory")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from worker.pull import pull_builtin

    model = Path(args.model)
    if model.name == BUILTIN_MODEL:
        pull_builtin(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(args.log_dir or tmp)
        data = tmp_path / "data"  # fresh: nothing cached from an earlier run
        logs = tmp_path / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {"MLXQ_DATA_DIR": str(data), "MLXQ_MODEL": str(model), "MLXQ_MODEL_NAME": BUILTIN_MODEL}
        db_url = f"sqlite:///{data / 'mlxq.sqlite'}"
        say("starting mlxq (embedded) and loading the model")
        svc = Service(env, logs).start()
        try:
            client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", timeout=args.timeout, max_retries=0)
            say("warming up")
            warm_up(client, svc.base, db_url, args)
            rounds, traces = run_rounds(client, svc.base, db_url, args)
        except BaseException:
            say(f"service logs:\n{svc.logs()}")
            raise
        finally:
            svc.stop()

    summary = medians(rounds)
    # The plot shows the round with the median speedup.
    pick = sorted(range(len(rounds)), key=lambda i: rounds[i]["speedup"] or 0)[len(rounds) // 2]
    oneby1, run = traces[pick]
    plot(Path(args.plot), oneby1, run, [p / 1000 for p in rounds[pick]["ttft_idle_all_ms"]], args)
    print(
        json.dumps(
            {
                "bench": "batch",
                "model": BUILTIN_MODEL,
                "prompts": args.prompts,
                "max_tokens": args.max_tokens,
                "repeat": args.repeat,
                "rounds": rounds,
                "median": summary,
                "targets": targets(summary),
                "plot": str(args.plot),
            }
        )
    )


if __name__ == "__main__":
    main()
