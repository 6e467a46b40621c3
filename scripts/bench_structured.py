"""Structured-output benchmark: what decoding under a grammar costs, and what it buys, beside mlx_lm.server.

One run, the built-in SmolLM2 (float32, as mlxq runs it on a Linux CPU), temperature 0:
- throughput: the same 16 concurrent requests to mlxq without and with a JSON schema (`response_format`), in
  alternating rounds; tokens/s side by side (target: constrained at least 0.9x unconstrained);
- validity: over a set of schemas, the share of answers that parse and validate, mlxq with `response_format`
  against mlx_lm.server with the schema only in the prompt (mlx_lm.server ignores `response_format`, its issue
  #1007), measured the same way (target 100 %);
- a plot (bench_structured.png).

    .venv/bin/python scripts/bench_structured.py [--rounds 3] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_agent import builtin_f32  # noqa: E402
from bench_concurrency import mlx_lm_server, mlxq_server  # noqa: E402

from mlxq.settings import BUILTIN_MODEL  # noqa: E402

PEOPLE = [
    "a retired sailor",
    "a young chemist",
    "a chess champion",
    "a baker from Lyon",
    "a park ranger",
    "a jazz pianist",
    "a marathon runner",
    "a school teacher",
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "job": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "job", "hobbies"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    },
    {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "reason": {"type": "string"}},
        "required": ["answer", "reason"],
    },
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "minItems": 3, "maxItems": 5},
    {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
        "required": ["title", "year"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "price": {"type": "number"}},
                    "required": ["name", "price"],
                },
                "minItems": 1,
            }
        },
        "required": ["items"],
    },
]
TASKS = [
    "Describe {who}.",
    "Name a city you like.",
    "Is the sea salty?",
    "Give a few numbers.",
    "Name a famous film.",
    "List things to buy at a market.",
]


def ask(base: str, model: str, content: str, max_tokens: int, response_format: dict | None) -> tuple[str, str]:
    body: dict = {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    }
    if response_format is not None:
        body["response_format"] = response_format
    r = httpx.post(
        f"{base}/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache, no-store"}, timeout=600
    )
    r.raise_for_status()
    data = r.json()
    return data["choices"][0]["message"]["content"] or "", data["choices"][0]["finish_reason"]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def decode(
    base: str, model: str, content: str, max_tokens: int, response_format: dict | None
) -> tuple[int, float, float]:
    """One streamed request: (completion tokens, when its first token came, when its last came)."""
    body: dict = {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": content}],
    }
    if response_format is not None:
        body["response_format"] = response_format
    first = last = 0.0
    tokens = 0
    headers = {"Cache-Control": "no-cache, no-store"}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return tokens, first, last


def round_tok_s(base: str, model: str, max_tokens: int, constrained: bool, tag: int) -> float:
    """16 concurrent streamed requests (two per person, each distinct): decoding tokens per second, all of them
    together (tokens after each one's first, over the time from the first first-token to the last last-token).
    Prefill is left out: a constrained answer ends sooner (its JSON closes), and a prefill shared over fewer tokens
    would read as a slower decoder."""
    fmt = schema_format(PERSON) if constrained else None
    prompts = [f"Describe {who} (variant {tag}.{k}). Answer in JSON." for k in range(2) for who in PEOPLE]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        runs = list(pool.map(lambda p: decode(base, model, p, max_tokens, fmt), prompts))
    started, ended = min(first for _, first, _ in runs if first), max(last for _, _, last in runs)
    return sum(max(tokens - 1, 0) for tokens, _, _ in runs) / max(ended - started, 1e-9)


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def validity(base: str, model: str, max_tokens: int, *, enforced: bool) -> tuple[float, float, int]:
    """The share of valid answers over SCHEMAS x 3 prompts: enforced (response_format), or the schema in the prompt."""
    results = []
    for schema, task in zip(SCHEMAS, TASKS, strict=True):
        for who in PEOPLE[:3]:
            prompt = task.format(who=who) + f" Answer only with JSON matching this schema: {json.dumps(schema)}"
            text, finish = ask(base, model, prompt, max_tokens * 2, schema_format(schema) if enforced else None)
            results.append((valid(text, schema), finish == "length"))
    finished = [ok for ok, cut in results if not cut]
    # (valid share of all answers, of those that finished, answers cut by max_tokens: a grammar cannot close those)
    return (
        sum(ok for ok, _ in results) / len(results),
        sum(finished) / max(len(finished), 1),
        len(results) - len(finished),
    )


def plot(out: Path, figures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.bar(
        ["mlxq free", "mlxq schema"], [figures["free_tok_s"], figures["constrained_tok_s"]], color=["#888", "#2a7"]
    )
    left.set_ylabel("decode tokens/s, 16 concurrent")
    left.set_title(f"throughput ({figures['ratio']:.2f}x)")
    right.bar(
        ["mlx_lm.server\n(schema in prompt)", "mlxq\n(response_format)"],
        [figures["valid_mlx_lm"], figures["valid_mlxq"]],
        color=["#888", "#2a7"],
    )
    right.set_ylim(0, 1.05)
    right.set_title("valid JSON share")
    fig.suptitle(f"{BUILTIN_MODEL} float32, temperature 0")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(ROOT / "bench_structured.png"))
    args = parser.parse_args()
    model_dir = builtin_f32()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        with mlxq_server("embedded", model_dir, tmp_path) as started:
            assert started is not None
            server, _ = started
            round_tok_s(server.base, server.model, 8, False, -1)  # warm-up: first-run costs, grammar compile
            round_tok_s(server.base, server.model, 8, True, -2)
            free, constrained = [], []
            for n in range(args.rounds):  # alternating, so both see the same machine
                free.append(round_tok_s(server.base, server.model, args.max_tokens, False, n))
                constrained.append(round_tok_s(server.base, server.model, args.max_tokens, True, n))
            valid_mlxq, finished_mlxq, cut_mlxq = validity(server.base, server.model, args.max_tokens, enforced=True)
        with mlx_lm_server(model_dir, tmp_path, args.max_tokens * 2) as baseline:
            valid_mlx_lm, finished_mlx_lm, cut_mlx_lm = validity(
                baseline.base, baseline.model, args.max_tokens, enforced=False
            )
    figures = {
        "free_tok_s": round(statistics.median(free), 1),
        "constrained_tok_s": round(statistics.median(constrained), 1),
        "ratio": round(statistics.median(constrained) / statistics.median(free), 3),
        "valid_mlxq": round(valid_mlxq, 3),
        "valid_mlx_lm": round(valid_mlx_lm, 3),
        "valid_of_finished": {"mlxq": round(finished_mlxq, 3), "mlx_lm": round(finished_mlx_lm, 3)},
        "cut_by_max_tokens": {"mlxq": cut_mlxq, "mlx_lm": cut_mlx_lm},
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
    }
    print(json.dumps(figures, indent=1))
    print(
        f"\n| | decode tokens/s, 16 concurrent | valid share ({len(SCHEMAS) * 3} answers) |\n|---|---|---|\n"
        f"| mlxq, no schema | {figures['free_tok_s']} | |\n"
        f"| mlxq, response_format schema | {figures['constrained_tok_s']} ({figures['ratio']:.2f}x) | "
        f"{figures['valid_mlxq']:.0%} |\n"
        f"| mlx_lm.server, schema in the prompt | | {figures['valid_mlx_lm']:.0%} |"
    )
    plot(Path(args.out), figures)


if __name__ == "__main__":
    main()
