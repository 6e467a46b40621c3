"""Agent-session benchmark: mlxq beside mlx_lm.server (which has its own LRU prompt cache), one run.

The session: a ~1,200-token system prompt plus 10 tool schemas, then 5 user turns each carrying the
growing history, streamed at temperature 0 with max_tokens 24; then an identical repeat of turn 1;
then /health latency during a 200-token generation; then mlxq is restarted and turn 2 is sent
again (bypassing the response cache) to see whether the prefix cache came back warm. The repeat
is the median of 10 sends, the warm turn 2 the median of 3; the first turn after the restart is
one send by nature.

Both servers get the same weights (a float32 copy: what mlxq runs on a Linux CPU), the same system
OpenBLAS, and the same prompt tokens: the tool schemas are written into the system prompt for both,
since the built-in model's chat template would drop a `tools` field on mlx_lm.server.

    .venv/bin/python scripts/bench_agent.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

from bench import health_during_generation, http_ttft, ms, start_mlx_lm  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

USERS = [
    "Look at src/app.py and tell me what the main function does.",
    "Now add a --verbose flag to the CLI parser.",
    "Write a unit test for the new flag.",
    "Run the tests and summarise any failures.",
    "Commit the change with a good message.",
]


def tools() -> list[dict]:
    names = [
        "read_file",
        "write_file",
        "list_dir",
        "run_shell",
        "search_code",
        "git_diff",
        "git_commit",
        "run_tests",
        "http_get",
        "ask_user",
    ]
    return [
        {
            "type": "function",
            "function": {
                "name": n,
                "description": f"{n.replace('_', ' ').capitalize()} in the user's repository. Use it "
                f"whenever the task needs it; arguments are validated strictly.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "A path relative to the repository root."},
                        "content": {"type": "string", "description": "Text to write or a command to run."},
                        "timeout_s": {"type": "integer", "description": "Give up after this many seconds."},
                    },
                    "required": ["path"],
                },
            },
        }
        for n in names
    ]


def system_prompt() -> str:
    rules = "\n".join(
        f"{i}. Rule {i}: keep changes small, explain the reason for each edit, never touch files outside "
        f"the repository, run the tests after every change, and report what you ran and what it printed."
        for i in range(1, 29)
    )
    schemas = "\n".join(json.dumps(t) for t in tools())
    return (
        f"You are an expert coding agent working in the user's repository.\n{rules}\n\n"
        f"# Tools\nYou may call these functions:\n<tools>\n{schemas}\n</tools>"
    )


def f32_copy(src: Path, dest: Path) -> Path:
    """A float32, unquantized copy of the model: what mlxq runs on a CPU, for both servers."""
    if (dest / "config.json").exists():
        return dest
    from worker.blas import preload_openblas

    preload_openblas()
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model, save_config, save_model

    model, tokenizer, config = load(str(src), return_config=True)
    dequantize_model(model)
    model.set_dtype(mx.float32)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    dest.mkdir(parents=True)
    save_model(dest, model)
    save_config(config, dest / "config.json")
    tokenizer.save_pretrained(str(dest))
    return dest


def builtin_f32() -> Path:
    """The built-in model's float32 copy beside it (pulled first when missing): what every benchmark serves."""
    from worker.pull import pull_builtin

    models = ROOT / ".data" / "models"
    return f32_copy(pull_builtin(models / BUILTIN_MODEL), models / f"{BUILTIN_MODEL}-f32")


def ttft(
    client: openai.OpenAI, model: str, messages: list[dict], headers: dict | None = None, usage: list | None = None
) -> tuple[float, str]:
    t = time.perf_counter()
    first, text = None, []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers or {},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None and usage is not None:
            details = chunk.usage.prompt_tokens_details
            usage.append((chunk.usage.prompt_tokens, details.cached_tokens if details else None))
    return (first if first is not None else time.perf_counter() - t), "".join(text)


def session(client: openai.OpenAI, model: str) -> dict:
    system = {"role": "system", "content": system_prompt()}
    history: list[dict] = [system]
    turns: list[float] = []
    usage: list[tuple[int, int | None]] = []
    for user in USERS:
        history.append({"role": "user", "content": user})
        seconds, answer = ttft(client, model, history, usage=usage)
        turns.append(seconds)
        history.append({"role": "assistant", "content": answer})
    first = [system, {"role": "user", "content": USERS[0]}]
    repeats = [ttft(client, model, first)[0] for _ in range(10)]
    payload = {"model": model, "messages": first, "temperature": 0, "max_tokens": 24, "stream": True}
    with httpx.Client(base_url=str(client.base_url).removesuffix("/v1/")) as http:
        raw = [http_ttft(http, payload) for _ in range(10)]
    return {
        "turns": turns,
        "repeat": statistics.median(repeats),
        "repeat_http": statistics.median(raw),
        "history": history,
        "prompt_and_cached_tokens": usage,
    }


def main() -> None:
    model_dir = builtin_f32()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # mlx_lm.server, with the system OpenBLAS like mlxq's worker.
        ref, ref_base = start_mlx_lm(model_dir, tmp_path / "mlx_lm.log", 24)
        (tmp_path / "logs").mkdir()
        svc = Service(
            {"MLXQ_DATA_DIR": str(tmp_path / "mlxq"), "MLXQ_MODEL": str(model_dir), "MLXQ_MODEL_NAME": BUILTIN_MODEL},
            tmp_path / "logs",
        ).start()
        try:
            mlxq = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="x", max_retries=0, timeout=300)
            mlxlm = openai.OpenAI(base_url=f"{ref_base}/v1", api_key="x", max_retries=0, timeout=300)
            ttft(mlxq, BUILTIN_MODEL, [{"role": "user", "content": "warm up"}])
            ttft(mlxlm, str(model_dir), [{"role": "user", "content": "warm up"}])
            ours = session(mlxq, BUILTIN_MODEL)
            prefix_session = svc.health()["prefix_cache"]
            theirs = session(mlxlm, str(model_dir))
            health = {
                "mlxq": health_during_generation(svc.base),
                "mlx_lm": health_during_generation(ref_base, str(model_dir)),
            }
            turn2 = ours["history"][:4]
            warm2 = statistics.median(
                ttft(mlxq, BUILTIN_MODEL, turn2, {"Cache-Control": "no-cache"})[0] for _ in range(3)
            )
            svc.restart()
            cold2, _ = ttft(mlxq, BUILTIN_MODEL, turn2, {"Cache-Control": "no-cache"})
            prefix = svc.health()["prefix_cache"]
        finally:
            svc.stop()
            ref.terminate()
            ref.wait(timeout=20)
    later_ours = statistics.median(ours["turns"][1:])
    later_theirs = statistics.median(theirs["turns"][1:])
    print(
        json.dumps(
            {
                "bench": "agent",
                "model": BUILTIN_MODEL,
                "ttft_ms": {"mlxq": [ms(t) for t in ours["turns"]], "mlx_lm": [ms(t) for t in theirs["turns"]]},
                "turn1_ratio": round(ours["turns"][0] / theirs["turns"][0], 3),
                "later_turns_median_ms": {
                    "mlxq": ms(later_ours),
                    "mlx_lm": ms(later_theirs),
                    "ratio": round(later_ours / later_theirs, 3),
                },
                "repeat_turn1_ms": {
                    "mlxq": ms(ours["repeat"]),
                    "mlx_lm": ms(theirs["repeat"]),
                    "speedup": round(theirs["repeat"] / ours["repeat"], 1),
                },
                "repeat_turn1_http_ms": {
                    "mlxq": ms(ours["repeat_http"]),
                    "mlx_lm": ms(theirs["repeat_http"]),
                    "speedup": round(theirs["repeat_http"] / ours["repeat_http"], 1),
                },
                "restart_turn2_ms": {"warm": ms(warm2), "after_restart": ms(cold2), "ratio": round(cold2 / warm2, 3)},
                "mlxq_prompt_and_cached_tokens_per_turn": ours["prompt_and_cached_tokens"],
                "mlxq_prefix_cache_after_session": prefix_session,
                "health_during_generation": health,
                "prefix_cache_after_restart": prefix,
            }
        )
    )


if __name__ == "__main__":
    main()
