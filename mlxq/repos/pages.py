"""Newest-first pages of a table with an owner (jobs, files, batches, stored responses), OpenAI-style: `after`
is the last id of the previous page."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session


def newest_first(
    session: Session, model: Any, *, owner: str | None, limit: int, after: str | None, oldest: bool = False
) -> Select:
    """A query of `model` rows (with `id`, `created_at`, `owner`) newest first (`oldest`: oldest first), only
    `owner`'s (None: keys are off), after the row `after` in that order; callers add their own filters."""
    if oldest:
        query = select(model).order_by(model.created_at.asc(), model.id.asc()).limit(limit)
    else:
        query = select(model).order_by(model.created_at.desc(), model.id.desc()).limit(limit)
    if owner is not None:
        query = query.where(model.owner == owner)
    if after is not None and (cursor := session.get(model, after)) is not None:
        if oldest:
            later = (model.created_at == cursor.created_at) & (model.id > cursor.id)
            query = query.where(or_(model.created_at > cursor.created_at, later))
        else:
            earlier = (model.created_at == cursor.created_at) & (model.id < cursor.id)
            query = query.where(or_(model.created_at < cursor.created_at, earlier))
    return query
