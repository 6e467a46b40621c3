"""scripts/analyze_traces.py on JSONL traces and on mlxq's own request log (SQLite, schema from Alembic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlxq.db import make_engine, make_sessionmaker, upgrade
from mlxq.repos import request_log
from mlxq.settings import Settings

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "analyze_traces.py"


def analyze(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


SYSTEM = "You are an agent. " * 50


def openai_body(user: str) -> dict:
    return {
        "model": "m",
        "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "tools": [{"type": "function", "function": {"name": "read_file", "parameters": {}}}],
    }


def test_jsonl_traces_from_other_proxies(tmp_path: Path):
    anthropic = {
        "model": "claude",
        "system": [{"type": "text", "text": SYSTEM}],
        "max_tokens": 64,
        "tools": [{"name": "bash", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "bash", "input": {"cmd": "ls"}}],
            },
        ],
    }
    lines = [
        json.dumps(openai_body("one")),
        json.dumps({"request": openai_body("two")}),
        json.dumps(openai_body("one")),
        json.dumps(anthropic),
        "not json",
        "",
    ]
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(lines))
    report = analyze(str(trace))
    assert (report["total_requests"], report["unique_requests"], report["unparsed_lines"]) == (4, 3, 1)
    assert report["potential_hit_rate"] == 0.25
    assert dict(report["top_tools_offered"]) == {"read_file": 3, "bash": 1}
    assert dict(report["top_tools_called"]) == {"bash": 1}
    assert report["prefix_tokens_saved_estimate"] > len(SYSTEM) // 4  # later requests share the system prompt


def test_request_log_report(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    upgrade(Settings(data_dir=tmp_path, database_url=url))
    rows = [
        {
            "at": 1.0,
            "key": "a",
            "endpoint": "chat",
            "cache": "MISS",
            "stream": False,
            "prompt_tokens": 100,
            "cached_tokens": 0,
            "completion_tokens": 5,
            "tools": ["read_file"],
            "latency_ms": 10.0,
        },
        {
            "at": 2.0,
            "key": "b",
            "endpoint": "chat",
            "cache": "MISS",
            "stream": True,
            "prompt_tokens": 120,
            "cached_tokens": 90,
            "completion_tokens": 5,
            "tools": ["read_file", "bash"],
            "latency_ms": 8.0,
        },
        {
            "at": 3.0,
            "key": "a",
            "endpoint": "chat",
            "cache": "HIT",
            "stream": False,
            "prompt_tokens": 100,
            "cached_tokens": 0,
            "completion_tokens": 5,
            "tools": ["read_file"],
            "latency_ms": 1.0,
        },
        {
            "at": 4.0,
            "key": "c",
            "endpoint": "chat",
            "cache": "BYPASS",
            "stream": False,
            "prompt_tokens": 50,
            "cached_tokens": 40,
            "completion_tokens": 5,
            "tools": None,
            "latency_ms": 9.0,
        },
    ]
    with make_sessionmaker(make_engine(url)).begin() as session:
        request_log.log_requests(session=session, rows=rows)
    report = analyze("--db", url)
    assert (report["total_requests"], report["unique_requests"]) == (4, 3)
    assert report["hit_rate"] == round(1 / 3, 4) and report["potential_hit_rate"] == 0.25
    assert report["prefix_tokens_saved"] == 130 and report["prefix_saved_fraction"] == round(130 / 270, 4)
    assert report["top_tools"][0] == ["read_file", 3]
