"""Uploaded and generated files (OpenAI's Files API): JSONL kept in the database."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import delete
from sqlalchemy.orm import Session, defer

from mlxq.repos.pages import newest_first
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
    *,
    session: Session,
    owner: str | None,
    purpose: str | None = None,
    limit: int = 100,
    after: str | None = None,
    oldest: bool = False,
) -> list[File]:
    query = newest_first(session, File, owner=owner, limit=limit, after=after, oldest=oldest)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return list(session.scalars(query.options(defer(File.content))))


def delete_file(*, session: Session, file_id: str) -> bool:
    return bool(rowcount(session.execute(delete(File).where(File.id == file_id))))


def prune(*, session: Session, before: float) -> int:
    """Retention: files older than `before`."""
    return rowcount(session.execute(delete(File).where(File.created_at < before)))
