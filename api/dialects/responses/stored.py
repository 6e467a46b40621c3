"""Stored responses (`store`, the default, and `background`): kept as a row naming the job that answers it,
read back as a response object rendered from that job, continued with `previous_response_id`, listed by their
input items, deleted. A stored response is its API key's (another key's is as absent as an unknown one) and
lives as long as the jobs do (MLXQ_JOB_RETENTION_S).

The job row holds the result and the state, so reading a stored response never changes anything.
"""

from __future__ import annotations

import asyncio
from typing import Any

from api.auth import owns
from api.dialects.responses.protocol import ItemReference, ResponsesRequest
from api.dialects.responses.render import ResponseContext, item_id, output_items
from api.errors import APIError
from api.services import Services
from mlxq.repos import responses
from mlxq.sql import Job, StoredResponse
from mlxq.states import JobStatus, ResponseStatus


def _read(
    services: Services, response_id: str, owner: str | None, param: str = "response_id"
) -> tuple[StoredResponse, Job]:
    """A stored response of `owner`'s, or a 404 naming `param` (the field that named the id)."""
    with services.sessions() as session:
        found = responses.get_response(session=session, response_id=response_id)
    row, job = found if found is not None else (None, None)
    if row is None or job is None or not owns(owner, row.owner):  # past retention, another key's
        raise APIError(404, f"No response with id '{response_id}' is stored.", code="not_found", param=param)
    return row, job


def context_of(row: StoredResponse, job: Job | None = None) -> ResponseContext:
    """The stored response's context; with its job, the canonical request it ran (the sampling it reports)."""
    return ResponseContext(
        request=ResponsesRequest.model_validate(row.request),
        model=row.model,
        id=row.id,
        created_at=row.created_at,
        previous=list(row.previous_items),
        cancelled=row.cancelled_at is not None,
        canonical=job.request if job is not None else None,
    )


async def load(
    services: Services, response_id: str, owner: str | None, *, param: str = "response_id"
) -> tuple[ResponseContext, Job]:
    row, job = await asyncio.to_thread(_read, services, response_id, owner, param)
    return context_of(row, job), job


# The id prefix OpenAI gives each kind of item.
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "custom_tool_call": "ctc"}


def input_items(context: ResponseContext) -> list[dict[str, Any]]:
    """The response's own input as items with ids and statuses (`input_items.list`, as the SDK's item types
    require them): a string is one user message, a message's string content one text part, as OpenAI lists them."""
    raw = context.request.input
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else _dumped(raw or [])
    out = []
    for i, item in enumerate(items):
        item = {**item}
        kind = item.setdefault("type", "message")
        if kind == "message":
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
            item["content"] = [
                {**p, "annotations": p.get("annotations") or []} if p.get("type") == "output_text" else p
                for p in item["content"]
            ]
        item.setdefault("status", ResponseStatus.COMPLETED)
        item.setdefault("id", item_id(f"{context.id}/input", ID_PREFIXES.get(kind, "item"), i))
        out.append(item)
    return out


def _dumped(items: list[Any]) -> list[dict[str, Any]]:
    return [item.model_dump(by_alias=True, exclude_none=True) for item in items]


# How many of a key's newest stored responses an `item_reference` is looked for in.
REFERENCE_SCAN = 500


async def resolve_references(services: Services, body: ResponsesRequest, owner: str | None) -> ResponsesRequest:
    """`body` with each `item_reference` input item replaced by the stored item it names: an input or output
    item of one of this key's stored responses (the newest REFERENCE_SCAN), as `input_items.list` and the
    response object show them. An id that names none is a 400 naming the item."""
    items = body.input if isinstance(body.input, list) else []
    wanted = {item.id for item in items if isinstance(item, ItemReference)}
    if not wanted:
        return body
    found = await asyncio.to_thread(_stored_items, services, wanted, owner)
    resolved = []
    for i, item in enumerate(items):
        if isinstance(item, ItemReference):
            if item.id not in found:
                raise APIError(
                    400,
                    f"No stored item with id '{item.id}' (item_reference).",
                    param=f"input.{i}.id",
                    code="not_found",
                )
            resolved.append(found[item.id])
        else:
            resolved.append(item.model_dump(by_alias=True, exclude_none=True))
    return ResponsesRequest.model_validate({**body.model_dump(by_alias=True, exclude_none=True), "input": resolved})


def _stored_items(services: Services, wanted: set[str], owner: str | None) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    with services.sessions() as session:
        stored_rows = responses.recent_responses(session=session, owner=owner, limit=REFERENCE_SCAN)
    for row, job in stored_rows:
        context = context_of(row)
        items = input_items(context)
        if job is not None and job.status == JobStatus.SUCCEEDED:
            items += output_items(job.result or {}, response_id=context.id, request=context.request)
        for item in items:
            if item.get("id") in wanted and item["id"] not in found:
                # As an input item: the output's status and ids are not part of what the model reads.
                found[item["id"]] = {k: v for k, v in item.items() if k != "status"}
        if len(found) == len(wanted):
            break
    return found


async def previous_items(services: Services, response_id: str | None, owner: str | None) -> list[dict[str, Any]]:
    """What a request continuing `response_id` prepends: that response's own earlier items, its input, its output.
    Only a completed (or incomplete) response can be continued."""
    if response_id is None:
        return []
    context, job = await load(services, response_id, owner, param="previous_response_id")
    if job.status != JobStatus.SUCCEEDED or context.cancelled:
        raise APIError(
            400,
            f"Response '{response_id}' is {context.render_job(job)['status']}: only a finished response can be "
            "continued.",
            param="previous_response_id",
        )
    output = output_items(job.result or {}, response_id=context.id, request=context.request)
    return [*context.previous, *input_items(context), *output]


def store(services: Services, context: ResponseContext, job_id: str, *, background: bool, owner: str | None) -> None:
    """Keep the response (blocking: run it in a thread)."""
    with services.sessions.begin() as session:
        responses.store_response(
            session=session,
            response_id=context.id,
            job_id=job_id,
            model=context.model,
            request=context.request.model_dump(by_alias=True, exclude_none=True),
            input_items=input_items(context),
            previous_items=context.previous,
            background=background,
            owner=owner,
            created_at=context.created_at,
        )


async def delete(services: Services, response_id: str, owner: str | None) -> None:
    def remove() -> None:
        _read(services, response_id, owner)
        with services.sessions.begin() as session:
            responses.delete_response(session=session, response_id=response_id)

    await asyncio.to_thread(remove)


async def cancel(services: Services, response_id: str, owner: str | None) -> dict[str, Any]:
    """Cancel a background response (the worker stops it within a second); a finished one is unchanged."""

    def stop() -> dict[str, Any]:
        row, _ = _read(services, response_id, owner)
        if not row.background:
            raise APIError(400, "Only a background response can be cancelled.", param="response_id")
        with services.sessions.begin() as session:
            responses.cancel_response(session=session, response_id=response_id)
        row, job = _read(services, response_id, owner)
        return context_of(row, job).render_job(job)

    return await asyncio.to_thread(stop)
