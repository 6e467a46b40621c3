"""OpenAI-style list pages, for jobs, files and batches alike."""

from __future__ import annotations

from typing import Any


def list_page(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A page from `limit + 1` rows read (the extra one only tells whether there are more)."""
    page = rows[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(rows) > limit,
    }
