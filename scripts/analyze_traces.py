"""What a workload would gain from each cache: read mlxq's request log, or JSONL traces from other proxies.

    .venv/bin/python scripts/analyze_traces.py                       # this service's request log (MLXQ_* settings)
    .venv/bin/python scripts/analyze_traces.py --db postgresql+psycopg://…
    .venv/bin/python scripts/analyze_traces.py traces.jsonl [more.jsonl]

Reports total and unique requests, the response-cache hit rate (what happened) and the potential
hit rate (repeats of an earlier identical request, what a cache could have served), prefix tokens
saved, and the most used tools. A JSONL line is an OpenAI chat or Anthropic messages request body,
bare or under "request"/"body"; for traces the shared prefix is measured on the canonical messages
text and reported in estimated tokens (characters / 4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxq.traces import from_jsonl, from_request_log  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="*", type=Path, help="JSONL files of request bodies")
    parser.add_argument("--db", help="SQL URL of an mlxq service (default: MLXQ_DATABASE_URL / the data dir)")
    args = parser.parse_args(argv)
    if args.traces:
        report = from_jsonl(args.traces)
    else:
        from mlxq.settings import Settings

        report = from_request_log(args.db or Settings().database_url)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
