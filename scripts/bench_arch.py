"""Agent sessions on every model family (issue 24): mlxq beside mlx_lm.server, one server at a time.

Per family of tests.families (tiny random-weight models with SmolLM2's tokenizer, built here: llama, llama-q4,
qwen3_next, granitemoehybrid, nemotron_h, gemma3_text, qwen3_moe, falcon_h1, deepseek_v3), and the built-in SmolLM2
itself (`smollm2`: its float32 copy; `smollm2-q4`: as pulled, 4-bit), each server in turn is started alone on the model
directory and sent:

- cold probes: single-turn requests whose system prompts share nothing (the cold TTFT, the median of them);
- four agent sessions, interleaved (turn 1 of each, then turn 2 of each, ...), five turns each, a ~1,000-token
  system prompt whose head is the same in every session and whose tail is the session's own (sessions share a
  prefix, then diverge); every turn streamed at temperature 0, max_tokens 24, the answer sent back verbatim as the
  assistant message of the next turn, as a client does (random weights answer gibberish: that is fine);
- the edited-history session: a fifth session that at turn 4 sends its 2nd assistant message changed (a client
  editing its history), then carries on with the edited history.

Measured, client-side, per request: TTFT (request sent to the first streamed content chunk) and the prompt's cached
share, `usage.prompt_tokens_details.cached_tokens / usage.prompt_tokens` from the stream's usage chunk
(stream_options.include_usage). Both servers report it: mlx_lm.server 0.32.2 puts the length of the prompt cache it
reused there. Were a server to report none, its share is estimated from TTFT (1 - later TTFT / the cold TTFT scaled
to the prompt's length) and marked "estimated".

Per family and server: cold TTFT (the probes' median), turn-1 TTFT (median over the sessions: the shared head may be
warm), later-turn TTFT (median over turns 2+ of every session), the later-turn cached share (pooled: sum of cached
over sum of prompt tokens, turns 2+ of every session; its minimum beside it); on the edited session, the share at the
edited turn and the share that precedes the edit (the tokens that render every message before the edited one, over
the prompt's tokens, counted with the model's tokenizer and chat template).

Targets (mlxq, every family, the plain one included): later-turn cached share >= 0.95 (mlx_lm.server's shown beside
it: about 0.94 on the hybrid and sliding-window families); the edited turn's share within 0.02 of the share that
precedes the edit; cold and later-turn TTFT <= 0.9x mlx_lm.server's. The prefix-cache budget and disk-tier targets
are measured by scripts/bench_prefix_tiers.py and only named here.

With `--size real` each family is built at SmolLM2-135M's width and about its depth (tests.families.REAL_SIZE) rather
than the tests' tiny size, whose forward is so cheap that a later turn's TTFT measures each server's fixed path.

Both servers load the same directory; on a Linux CPU mlxq's worker runs the 4-bit llama dequantized to float32 (its
fastest CPU path), mlx_lm.server runs it quantized.

    .venv/bin/python scripts/bench_arch.py [--families llama,qwen3_next] [--configs mlxq,mlx_lm] [--quick]
        [--size tiny|real] [--out .data/bench_arch.png] [--workdir DIR]

Prints a table per family, PASS/MISS per target, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import ms, start_mlx_lm, stop_process  # noqa: E402
from bench_agent import builtin_f32  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402
from tests.families import MODELS, build  # noqa: E402

CONFIGS = ("mlxq", "mlx_lm")
MAX_TOKENS = 24
SHARE_TARGET = 0.95
EDIT_TOLERANCE = 0.02
TTFT_RATIO_TARGET = 0.9
EDIT_TURN = 4  # the turn (1-based) that sends the edited history
EDITED_ANSWER = 2  # which assistant message (1-based) the client changed
EDITED_TEXT = "Let me start over: the build script compiles each module on its own and links them all at the end."
# Families whose caches cannot be trimmed to a shorter prompt (recurrent state, a sliding window): mlx_lm.server
# reuses only whole cached prompts on them.
NOT_TRIMMABLE = {"qwen3_next", "granitemoehybrid", "nemotron_h", "gemma3_text", "falcon_h1"}
ELSEWHERE = "see bench_prefix_tiers"
# The built-in SmolLM2 itself, as pulled (4-bit, 8-bit embeddings) and as the float32 copy the other benchmarks serve:
# the plain family at a size whose forward costs what a user's model's does. On the tiny models a later turn's TTFT is
# 20-30 ms, most of it a fixed cost of each server's path (mlxq's api, queue and worker hops against mlx_lm.server's
# one process), not the model.
REAL = {"smollm2": False, "smollm2-q4": True}

PROJECTS = ["orchard", "lighthouse", "quarry", "meridian", "tundra", "harbor", "copper", "saffron"]
USERS = [
    "Look at src/{p}/main.py and tell me what the main function of the {p} service does.",
    "Now add a --verbose flag to the {p} command-line parser and explain where it goes.",
    "Write a unit test for the new flag in tests/test_{p}.py, covering both settings.",
    "Run the {p} test suite and summarise any failures you see, with the file and line.",
    "Commit the change to {p} with a good message that says why, not only what.",
]


# -- prompts -------------------------------------------------------------------------------------------------


class Prompts:
    """System prompts of a chosen length in tokens (the model's tokenizer), and the token arithmetic of a chat."""

    def __init__(self, model_dir: Path, system_tokens: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.system_tokens = system_tokens
        self.head = self._grow(
            "You are an expert coding agent working in the user's repository.\n",
            lambda i: (
                f"{i}. Rule {i}: keep changes small, explain the reason for each edit, never touch files "
                f"outside the repository, run the tests after every change, and report what ran and what it printed.\n"
            ),
            system_tokens * 3 // 4,
        )

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _grow(self, start: str, line, tokens: int) -> str:
        text, i = start, 1
        while self.count(text) < tokens:
            text += line(i)
            i += 1
        return text

    def system(self, key: str) -> str:
        """The shared head, then a tail of the `key` project's own notes up to the full length."""
        tail = self._grow(
            f"\n# Project {key}\n",
            lambda i: (
                f"- Note {i} on {key}: the {key} module {i} owns its own configuration; read "
                f"{key}/conf_{i}.toml before touching {key}/mod_{i}.py.\n"
            ),
            self.system_tokens - self.count(self.head),
        )
        return self.head + tail

    def cold(self, i: int) -> str:
        """A system prompt as long as the sessions' that shares none of their head (nor another probe's)."""
        return self._grow(
            f"Probe {i}. You answer questions about gardening in region {i}.\n",
            lambda j: (
                f"{j}. In region {i}, bed {j} gets water on day {(i * 7 + j) % 5} and compost every "
                f"{j % 3 + 2} weeks; note {i}-{j}.\n"
            ),
            self.system_tokens,
        )

    def tokens(self, messages: list[dict[str, str]], *, generation: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def starts_at(self, messages: list[dict[str, str]], k: int) -> int:
        """Where messages[k] starts in the prompt of `messages`: the tokens that render messages[:k] exactly."""
        head = self.tokens(messages[:k], generation=False)
        full = self.tokens(messages, generation=True)
        assert full[: len(head)] == head, "the template renders the earlier messages the same in the longer prompt"
        return len(head)


# -- one request ---------------------------------------------------------------------------------------------


def send(http: httpx.Client, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One streamed chat turn: TTFT (to the first content chunk; the whole request when none came), the answer, and
    the usage's prompt and cached tokens (cached None when the server reports none)."""
    payload = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    time.sleep(0.2)  # let the BLAS threads of the request before go idle: they spin a while after work
    t = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] | None = None
    with http.stream("POST", "/v1/chat/completions", json=payload, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first if first is not None else time.perf_counter() - t
                    text.append(content)
            if chunk.get("usage"):
                usage = chunk["usage"]
    total = time.perf_counter() - t
    if usage is None:
        raise RuntimeError("no usage chunk in the stream (stream_options.include_usage)")
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft": first if first is not None else total,
        "answer": "".join(text),
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": details.get("cached_tokens"),
    }


# -- one server on one family -------------------------------------------------------------------------------


def run_server(http: httpx.Client, model: str, prompts: Prompts, args: argparse.Namespace) -> dict[str, Any]:
    send(http, model, [{"role": "user", "content": "Warm up, please."}])
    # A long one too: the first long prefill of a process pays for buffers no later request does.
    send(http, model, [{"role": "system", "content": prompts.cold(args.cold)}, {"role": "user", "content": "Hi."}])
    cold = [
        send(http, model, [{"role": "system", "content": prompts.cold(i)}, {"role": "user", "content": "Hi."}])
        for i in range(args.cold)
    ]

    # The interleaved sessions: turn 1 of each, then turn 2 of each, ...
    keys = [PROJECTS[s % len(PROJECTS)] + ("" if s < len(PROJECTS) else str(s)) for s in range(args.sessions)]
    histories = [[{"role": "system", "content": prompts.system(key)}] for key in keys]
    turns: list[list[dict[str, Any]]] = [[] for _ in keys]
    for t in range(args.turns):
        for s, key in enumerate(keys):
            histories[s].append({"role": "user", "content": USERS[t % len(USERS)].format(p=key)})
            reply = send(http, model, histories[s])
            turns[s].append(reply)
            histories[s].append({"role": "assistant", "content": reply["answer"]})

    # The edited-history session, after them: at turn EDIT_TURN the EDITED_ANSWER-th assistant message is changed.
    key = "edited"
    history = [{"role": "system", "content": prompts.system(key)}]
    edited: list[dict[str, Any]] = []
    for t in range(max(args.turns, EDIT_TURN)):
        history.append({"role": "user", "content": USERS[t % len(USERS)].format(p=key)})
        at = None
        if t + 1 == EDIT_TURN:
            index = 2 * EDITED_ANSWER  # [system, user, assistant, user, assistant, ...]
            assert history[index]["role"] == "assistant"
            history[index] = {"role": "assistant", "content": EDITED_TEXT}
            at = prompts.starts_at(history, index)
        reply = send(http, model, history)
        reply["edit_starts_at"] = at
        edited.append(reply)
        history.append({"role": "assistant", "content": reply["answer"]})

    # The prompts counted here and by the server should agree: a check on the token arithmetic of the edit.
    expected_prompt = len(prompts.tokens(history[:-1], generation=True))
    return summarize(cold, turns, edited, expected_prompt)


def share(reply: dict[str, Any]) -> float | None:
    if reply["cached_tokens"] is None:
        return None
    return reply["cached_tokens"] / reply["prompt_tokens"]


def summarize(
    cold: list[dict[str, Any]], turns: list[list[dict[str, Any]]], edited: list[dict[str, Any]], expected_prompt: int
) -> dict[str, Any]:
    cold_ttft = statistics.median(r["ttft"] for r in cold)
    cold_tokens = statistics.median(r["prompt_tokens"] for r in cold)
    estimated = any(r["cached_tokens"] is None for session in turns for r in session) or any(
        r["cached_tokens"] is None for r in edited
    )
    if estimated:
        # The server reports no cached tokens: what a request did not prefill, from its TTFT against a cold
        # prefill of its length (the cold probes' TTFT, scaled by prompt length).
        for r in [*(r for session in turns for r in session), *edited]:
            full = cold_ttft * r["prompt_tokens"] / cold_tokens
            r["cached_tokens"] = round(r["prompt_tokens"] * min(1.0, max(0.0, 1 - r["ttft"] / full)))
    later = [r for session in turns for r in session[1:]]
    first = [session[0] for session in turns]
    edit = edited[EDIT_TURN - 1]
    before_edit = edit["edit_starts_at"] / edit["prompt_tokens"]
    return {
        "cold_ttft_ms": ms(cold_ttft),
        "cold_prompt_tokens": cold_tokens,
        "turn1_ttft_ms": ms(statistics.median(r["ttft"] for r in first)),
        "turn1_share": round(statistics.median(share(r) or 0.0 for r in first), 4),
        "later_ttft_ms": ms(statistics.median(r["ttft"] for r in later)),
        "later_share": round(sum(r["cached_tokens"] for r in later) / sum(r["prompt_tokens"] for r in later), 4),
        "later_share_min": round(min(share(r) or 0.0 for r in later), 4),
        "share_estimated": estimated,
        "edit": {
            "share": round(share(edit) or 0.0, 4),
            "share_before_edit": round(before_edit, 4),
            "prompt_tokens": edit["prompt_tokens"],
            "cached_tokens": edit["cached_tokens"],
            "edit_starts_at": edit["edit_starts_at"],
            "next_turn_share": round(share(edited[EDIT_TURN]) or 0.0, 4) if len(edited) > EDIT_TURN else None,
            "prompt_tokens_agree": edited[-1]["prompt_tokens"] == expected_prompt,
        },
        "sessions": [
            {
                "ttft_ms": [ms(r["ttft"]) for r in session],
                "prompt_tokens": [r["prompt_tokens"] for r in session],
                "cached_tokens": [r["cached_tokens"] for r in session],
            }
            for session in turns
        ],
        "edited_session": {
            "ttft_ms": [ms(r["ttft"]) for r in edited],
            "prompt_tokens": [r["prompt_tokens"] for r in edited],
            "cached_tokens": [r["cached_tokens"] for r in edited],
        },
    }


def run_mlxq(name: str, model_dir: Path, prompts: Prompts, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    logs = tmp / f"logs-mlxq-{name}"
    logs.mkdir()
    env = {"MLXQ_DATA_DIR": str(tmp / f"mlxq-{name}"), "MLXQ_MODEL": str(model_dir), "MLXQ_MODEL_NAME": name}
    svc = Service(env, logs).start()
    try:
        with httpx.Client(base_url=svc.base) as http:
            result = run_server(http, name, prompts, args)
        result["prefix_cache"] = svc.health().get("prefix_cache")
        return result
    except Exception:
        print(svc.logs(), file=sys.stderr)
        raise
    finally:
        svc.stop()


def run_mlx_lm(name: str, model_dir: Path, prompts: Prompts, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    log = tmp / f"mlx_lm-{name}.log"
    proc, base = start_mlx_lm(model_dir, log, MAX_TOKENS)
    try:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with httpx.Client(base_url=base) as http:
            return run_server(http, str(model_dir), prompts, args)
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        stop_process(proc)


# -- targets, table, plot ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def targets(row: dict[str, Any]) -> dict[str, Any]:
    """PASS/MISS of mlxq against each target (a ratio needs mlx_lm.server's run too)."""
    ours, theirs = row.get("mlxq"), row.get("mlx_lm")
    out: dict[str, Any] = {}
    if ours:
        out["later_share>=0.95"] = verdict(ours["later_share"] >= SHARE_TARGET)
        gap = abs(ours["edit"]["share"] - ours["edit"]["share_before_edit"])
        out["edit_share_within_0.02"] = verdict(gap <= EDIT_TOLERANCE)
    if ours and theirs:
        row["ratios"] = {
            "cold_ttft": round(ours["cold_ttft_ms"] / theirs["cold_ttft_ms"], 3),
            "turn1_ttft": round(ours["turn1_ttft_ms"] / theirs["turn1_ttft_ms"], 3),
            "later_ttft": round(ours["later_ttft_ms"] / theirs["later_ttft_ms"], 3),
        }
        out["cold_ttft<=0.9x"] = verdict(row["ratios"]["cold_ttft"] <= TTFT_RATIO_TARGET)
        out["later_ttft<=0.9x"] = verdict(row["ratios"]["later_ttft"] <= TTFT_RATIO_TARGET)
    out["warm_sessions_1.8x_idle_form"] = ELSEWHERE
    out["disk_tier_hit_3x"] = ELSEWHERE
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'family':<17} {'server':<7} {'cold ms':>8} {'turn1 ms':>9} {'later ms':>9} {'later share':>11} "
        f"{'(min)':>6} {'edit share':>10} {'before edit':>11}"
    )
    lines = [head, "-" * len(head)]
    for family, row in rows.items():
        for config in CONFIGS:
            r = row.get(config)
            if not r:
                continue
            star = "~" if r["share_estimated"] else " "
            lines.append(
                f"{family:<17} {config:<7} {r['cold_ttft_ms']:>8.1f} {r['turn1_ttft_ms']:>9.1f} "
                f"{r['later_ttft_ms']:>9.1f} {r['later_share']:>10.3f}{star} {r['later_share_min']:>6.3f} "
                f"{r['edit']['share']:>10.3f} {r['edit']['share_before_edit']:>11.3f}"
            )
        if "ratios" in row:
            ratios = row["ratios"]
            lines.append(
                f"{'':<17} {'ratio':<7} {ratios['cold_ttft']:>8.3f} {ratios['turn1_ttft']:>9.3f} "
                f"{ratios['later_ttft']:>9.3f}   (mlxq / mlx_lm.server TTFT)"
            )
        lines.append(f"{'':<17} targets " + "  ".join(f"{k} {v}" for k, v in row["targets"].items()))
    if any(r.get(c, {}).get("share_estimated") for r in rows.values() for c in CONFIGS):
        lines.append("~ estimated from TTFT: the server reported no cached tokens")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    families = list(rows)
    x = range(len(families))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(families) + 4), 4.5))
    width = 0.38
    for i, config in enumerate(CONFIGS):
        values = [rows[f].get(config, {}).get("later_share", 0.0) for f in families]
        left.bar([p + (i - 0.5) * width for p in x], values, width, label=config)
    left.axhline(SHARE_TARGET, color="k", linestyle="--", linewidth=1, label=f"target {SHARE_TARGET}")
    left.set_ylim(0.8, 1.0)
    left.set_title("later-turn cached share")
    for i, what in enumerate(("cold_ttft", "later_ttft")):
        values = [rows[f].get("ratios", {}).get(what, 0.0) for f in families]
        right.bar([p + (i - 0.5) * width for p in x], values, width, label=what.replace("_", " "))
    right.axhline(TTFT_RATIO_TARGET, color="k", linestyle="--", linewidth=1, label=f"target {TTFT_RATIO_TARGET}x")
    right.set_title("TTFT, mlxq / mlx_lm.server")
    for ax in (left, right):
        ax.set_xticks(list(x), families, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*MODELS, *REAL]
    parser.add_argument("--families", default=None, help=f"comma-separated, of {','.join(names)} (default: all)")
    parser.add_argument("--configs", default="mlxq,mlx_lm")
    parser.add_argument("--quick", action="store_true", help="llama,qwen3_next; 2 sessions x 3 turns; 300 tokens")
    parser.add_argument("--sessions", type=int, default=None, help="interleaved sessions (4; --quick 2)")
    parser.add_argument("--turns", type=int, default=None, help="turns per session (5; --quick 3)")
    parser.add_argument("--system-tokens", type=int, default=None, help="system prompt length (1000; --quick 300)")
    parser.add_argument("--cold", type=int, default=None, help="cold probes per server (3; --quick 2)")
    parser.add_argument(
        "--size",
        choices=("tiny", "real"),
        default="tiny",
        help="the families' models: tiny (the tests') or real (SmolLM2-135M's width and about its depth: "
        "tests.families.REAL_SIZE)",
    )
    parser.add_argument("--workdir", default=None, help="keep models and server logs here (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / ".data" / "bench_arch.png"), help="the plot")
    args = parser.parse_args()
    quick = args.quick
    args.sessions = args.sessions or (2 if quick else 4)
    args.turns = args.turns or (3 if quick else 5)
    args.system_tokens = args.system_tokens or (300 if quick else 1000)
    args.cold = args.cold or (2 if quick else 3)
    families = (args.families or ("llama,qwen3_next" if quick else ",".join(names))).split(",")
    configs = args.configs.split(",")
    for name in families:
        if name not in names:
            parser.error(f"unknown family {name!r}: one of {', '.join(names)}")
    for config in configs:
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}: one of {', '.join(CONFIGS)}")

    from worker.blas import preload_openblas

    preload_openblas()  # before anything imports mlx (transformers may): the models are built in this process
    from worker.pull import pull_builtin

    smollm2 = pull_builtin(ROOT / ".data" / "models" / BUILTIN_MODEL)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.workdir:
            tmp_path = Path(args.workdir)
            tmp_path.mkdir(parents=True, exist_ok=False)
        prompts = Prompts(smollm2, args.system_tokens)
        for name in families:
            if name in REAL:
                family, quantize = "llama", REAL[name]
                model_dir = smollm2 if quantize else builtin_f32()
            else:
                family, quantize = MODELS[name]
                real = args.size == "real"
                model_dir = build(family, tmp_path / "models" / name, smollm2, quantize=quantize, real=real)
            row: dict[str, Any] = {
                "family": family,
                "size": "real" if name in REAL else args.size,
                "quantized": quantize,
                "trimmable": family not in NOT_TRIMMABLE,
            }
            for config in configs:  # one server at a time
                run = run_mlxq if config == "mlxq" else run_mlx_lm
                row[config] = run(name, model_dir, prompts, args, tmp_path)
            row["targets"] = targets(row)
            rows[name] = row
            print(f"# {name} done", file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        plot(rows, Path(args.out))
        print(f"plot: {args.out}")
    print(
        json.dumps(
            {
                "bench": "arch",
                "sessions": args.sessions,
                "turns": args.turns,
                "system_tokens": args.system_tokens,
                "max_tokens": MAX_TOKENS,
                "edit": {"turn": EDIT_TURN, "assistant_message": EDITED_ANSWER},
                "families": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
