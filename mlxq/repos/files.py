"""Uploaded and generated files (OpenAI's Files API): JSONL kept in the database."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, defer

from mlxq.sql import File, rowcount
from mlxq.states import FilePurpose


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def create_file(*, session: Session, purpose: FilePurpose, filename: str, content: bytes, owner: str | None) -> File:
    file = File(
        id=new_id("file"),
        purpose=purpose,
        filename=filename,
        bytes=len(content),
        content=content,
        created_at=time.time(),
        owner=owner,
    )
    session.add(file)
    return file


def get_file(*, session: Session, file_id: str) -> File | None:
    return session.get(File, file_id)


def list_files(
    *, session: Session, owner: str | None, purpose: str | None = None, limit: int = 100, after: str | None = None
) -> list[File]:
    query = select(File).order_by(File.created_at.desc(), File.id.desc()).limit(limit)
    if owner is not None:
        query = query.where(File.owner == owner)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None and (cursor := session.get(File, after)) is not None:
        query = query.where(
            (File.created_at < cursor.created_at) | ((File.created_at == cursor.created_at) & (File.id < cursor.id))
        )
    return list(session.scalars(query.options(defer(File.content))))


def delete_file(*, session: Session, file_id: str) -> bool:
    return bool(rowcount(session.execute(delete(File).where(File.id == file_id))))


def prune(*, session: Session, before: float) -> int:
    """Retention: files older than `before`."""
    return rowcount(session.execute(delete(File).where(File.created_at < before)))
