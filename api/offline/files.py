"""OpenAI's Files API (`/v1/files`): JSONL uploads for batches, and the output and error files batches write."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api.auth import AUTHENTICATED, Owner, owns
from api.errors import APIError
from api.offline.pages import list_page
from api.services import ServicesDep
from mlxq.repos import files
from mlxq.sql import File as FileRow
from mlxq.states import FilePurpose, FileStatus

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=AUTHENTICATED)


def file_object(file: FileRow) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": FileStatus.PROCESSED,
        "expires_at": None,
        "status_details": None,
    }


def owned_file(session: Session, file_id: str, owner: str | None, *, param: str = "file_id") -> FileRow:
    """The file, if it is the caller's: another key's file is as absent as an unknown one (404)."""
    file = files.get_file(session=session, file_id=file_id)
    if file is None or not owns(owner, file.owner):
        raise APIError(404, f"No file with id {file_id!r}.", code="file_not_found", param=param)
    return file


@router.post("")
async def upload_file(
    services: ServicesDep, owner: Owner, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    if purpose != FilePurpose.BATCH:
        raise APIError(400, "Only purpose 'batch' is supported.", param="purpose")
    limit = int(services.settings.max_file_mb * 2**20)
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise APIError(
            413, f"The file is larger than {services.settings.max_file_mb:g} MB.", code="file_too_large", param="file"
        )

    def store() -> dict[str, Any]:
        with services.sessions.begin() as session:
            row = files.create_file(
                session=session,
                purpose=FilePurpose.BATCH,
                filename=file.filename or "upload.jsonl",
                content=content,
                owner=owner,
            )
            return file_object(row)

    return await asyncio.to_thread(store)


@router.get("")
async def list_files(
    services: ServicesDep,
    owner: Owner,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with services.sessions() as session:
            rows = files.list_files(
                session=session, owner=owner, purpose=purpose, limit=limit + 1, after=after, oldest=order == "asc"
            )
            return [file_object(f) for f in rows]

    return list_page(await asyncio.to_thread(read), limit)


@router.get("/{file_id}")
async def get_file(file_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with services.sessions() as session:
            return file_object(owned_file(session, file_id, owner))

    return await asyncio.to_thread(read)


@router.get("/{file_id}/content")
async def file_content(file_id: str, services: ServicesDep, owner: Owner) -> Response:
    def read() -> bytes:
        with services.sessions() as session:
            return owned_file(session, file_id, owner).content

    return Response(await asyncio.to_thread(read), media_type="application/jsonl")


@router.delete("/{file_id}")
async def delete_file(file_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    def delete() -> None:
        with services.sessions.begin() as session:
            owned_file(session, file_id, owner)
            if not files.delete_file(session=session, file_id=file_id):
                raise APIError(404, f"No file with id {file_id!r}.", code="file_not_found", param="file_id")

    await asyncio.to_thread(delete)
    return {"id": file_id, "object": "file", "deleted": True}
