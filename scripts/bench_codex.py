"""Codex through mlxq: first-turn and later-turn latency, and the cached share of the prompt on later turns.

Codex (0.171, from npm) speaks only the Responses API and sends its whole history every turn with
`store: false`, so the prefix cache is what makes a session usable. This runs one Codex session of
`--turns` turns (`codex exec`, then `codex exec resume --last`) against mlxq on the built-in model, greedy,
with Codex's prompt shortened to fit the model's 8k context and its shell tools kept, and reads each request's
prompt and cached tokens from the request log; then the same session with the prefix cache off, in the same run. mlx_lm.server serves no Responses API, so Codex cannot be
pointed at it: there is no side-by-side figure.

    .venv/bin/python scripts/bench_codex.py [--turns 4]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxq.procs import Service, codex_home, install_codex, run_codex  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "And the capital of Germany?",
    "And of Italy?",
    "Name one river in each of those countries.",
    "Which of the three cities is the largest?",
]


def session(codex: Path, models: Path, turns: int, *, prefix_cache: bool) -> dict:
    """One Codex session on a fresh mlxq: each turn's wall time, and each request's prompt and cached tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "logs").mkdir()
        env = {
            "MLXQ_DATA_DIR": str(tmp_path / "data"),
            "MLXQ_MODEL": str(models / MODEL_NAME if (models / MODEL_NAME).exists() else BUILTIN_MODEL),
            "MLXQ_MODEL_NAME": MODEL_NAME,
            "MLXQ_DEFAULT_TEMPERATURE": "0",
            "MLXQ_PREFIX_CACHE": "true" if prefix_cache else "false",
        }
        svc = Service(env, tmp_path / "logs").start()
        try:
            home = codex_home(tmp_path / "codex", base_url=f"{svc.base}/v1", model=MODEL_NAME, small=True, shell=True)
            work = tmp_path / "work"
            work.mkdir()
            walls = []
            for n, prompt in enumerate(PROMPTS[:turns]):
                started = time.perf_counter()
                done = run_codex(codex, home, prompt, work, resume=n > 0)
                walls.append(round(time.perf_counter() - started, 2))
                if done.returncode:
                    raise SystemExit(f"codex exited {done.returncode}: {done.stderr[-2000:]}")
            svc.health()  # flushes the request log
            time.sleep(1.5)
        finally:
            svc.stop()
        db = sqlite3.connect(tmp_path / "data" / "mlxq.sqlite")
        rows = db.execute(
            "SELECT prompt_tokens, cached_tokens FROM request_log WHERE endpoint = 'responses' ORDER BY id"
        ).fetchall()
        db.close()
    later = rows[1:]
    prompt, cached = sum(r[0] or 0 for r in later), sum(r[1] or 0 for r in later)
    return {
        "turn_s": walls,
        "prompt_tokens": [r[0] for r in rows],
        "cached_tokens": [r[1] for r in rows],
        "first_turn_s": walls[0],
        "later_turn_median_s": statistics.median(walls[1:]) if len(walls) > 1 else None,
        "later_cached_share": round(cached / prompt, 3) if prompt else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--models", type=Path, default=ROOT / ".data" / "models")
    args = parser.parse_args()
    codex = install_codex(args.models)
    arms = {
        name: session(codex, args.models, args.turns, prefix_cache=on)
        for name, on in (("mlxq", True), ("mlxq, prefix cache off", False))
    }
    on, off = arms["mlxq"], arms["mlxq, prefix cache off"]
    ratio = off["later_turn_median_s"] / on["later_turn_median_s"] if on["later_turn_median_s"] else None
    print(json.dumps({**arms, "later_turn_speedup_from_prefix_cache": round(ratio, 2) if ratio else None}, indent=1))


if __name__ == "__main__":
    main()
