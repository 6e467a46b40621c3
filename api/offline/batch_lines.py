"""The lines of a batch's input file, each checked as its endpoint would check it (api.pipeline.prepare), and made
into the job spec of a batch line: low priority, never streamed, kept as a row, sent when there is room
(windowed), and not counted against the queue ceiling (a batch is bounded by MLXQ_MAX_BATCH_LINES)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from api.errors import APIError
from api.pipeline.prepare import parse, prepare
from api.services import Services
from mlxq.jobspec import JobSpec


@dataclass(frozen=True)
class Line:
    """One non-blank input line: its job spec, or the error that refused it (in the error file)."""

    line: int
    custom_id: str | None
    spec: JobSpec | None
    error: dict[str, Any] | None


def _refused(line: int, code: str, message: str, custom_id: Any = None) -> Line:
    custom = custom_id if isinstance(custom_id, str) else None
    return Line(line, custom, None, {"code": code, "message": f"line {line}: {message}", "line": line})


async def read_lines(services: Services, endpoint: str, content: bytes, owner: str | None) -> list[Line]:
    """Every non-blank line, in order. Runs on the event loop (the checks may read the model's facts) in
    slices, so a large file never holds the loop for long."""
    out: list[Line] = []
    seen: set[str] = set()
    for n, raw_line in enumerate(content.split(b"\n"), start=1):
        if n % 64 == 0:
            await asyncio.sleep(0)
        if raw_line.strip():
            out.append(await _read_line(services, endpoint, n, raw_line, owner, seen))
    return out


async def _read_line(
    services: Services, endpoint: str, n: int, raw_line: bytes, owner: str | None, seen: set[str]
) -> Line:
    try:
        item = json.loads(raw_line)
    except ValueError as exc:
        return _refused(n, "invalid_json", f"not valid JSON ({exc}).")
    if not isinstance(item, dict):
        return _refused(n, "invalid_request", "each line must be a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _refused(n, "missing_custom_id", "custom_id must be a non-empty string.", custom_id)
    if custom_id in seen:
        return _refused(n, "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line.", custom_id)
    seen.add(custom_id)
    if item.get("method", "POST") != "POST":
        return _refused(n, "invalid_method", "method must be POST.", custom_id)
    if item.get("url") != endpoint:
        return _refused(n, "mismatched_url", f"url must be the batch's endpoint {endpoint!r}.", custom_id)
    if not isinstance(item.get("body"), dict):
        return _refused(n, "invalid_request", "body must be a JSON object.", custom_id)
    try:
        incoming = parse(endpoint, item["body"])
        if incoming.stream:
            raise APIError(400, "A batch line is not streamed.", param="stream")
        prepared = await prepare(services, incoming)
        if len(prepared.requests) != 1:
            raise APIError(400, "A batch line takes one prompt.", param="prompt")
    except APIError as exc:
        return _refused(n, exc.code or "invalid_request", exc.message, custom_id)
    low = prepared.requests[0].model_copy(update={"priority": "low"})
    spec = await services.admission.spec_for(prepared.kind, low, owner=owner, endpoint=endpoint)
    return Line(n, custom_id, dataclasses.replace(spec, keep_row=True, windowed=True, counted=False), None)
