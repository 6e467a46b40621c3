"""The README's endpoint table and the app agree: every route it lists answers on the real service (not a 404 for
an unknown path, not a 405), and every route the app serves is listed."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from mlxq.procs import Service
from mlxq.settings import Settings
from tests.conftest import ROOT, service_env

README = ROOT / "README.md"
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)`")


def normal(path: str) -> str:
    """A path with its parameters unnamed (`{id}` and `{job_id}` are one route)."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def documented() -> set[tuple[str, str]]:
    """(method, path) of every route in the README's endpoint table (from its header row to the first blank line)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("| endpoint | |")
    table = text[start : text.index("\n\n", start)]
    return {(method, normal(path)) for method, path in ROUTE.findall(table)}


def _flat(routes: Iterable[Any]) -> Iterator[Any]:
    # FastAPI keeps an included router's routes behind it (`original_router`); each route's path has its prefix.
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


def served(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, from `app.routes` (FastAPI's own docs pages left out)."""
    app = create_app(Settings(data_dir=tmp_path / "data"), migrate=False)
    return {
        (method, normal(route.path))
        for route in _flat(app.routes)
        if getattr(route, "include_in_schema", False)
        for method in set(getattr(route, "methods", None) or ()) - {"HEAD"}
    }


def test_every_route_served_is_in_the_readme_and_every_listed_one_is_served(tmp_path: Path):
    table, app = documented(), served(tmp_path)
    assert len(table) > 20  # the table was read
    assert app - table == set(), "served but not in the README's endpoint table"
    assert table - app == set(), "in the README's endpoint table but not served"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("readme-routes")
    (root / "logs").mkdir()
    service = Service(service_env(root, root / "no-model", MLXQ_REQUEST_TIMEOUT_S="5"), root / "logs")
    service.start(worker=False)  # the api alone: every route answers (or refuses) without a model
    try:
        yield service
    finally:
        service.stop()


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "path"), sorted(documented()), ids=lambda v: str(v))
def test_every_route_in_the_readme_answers(api: Service, method: str, path: str):
    url = api.base + path.replace("{}", "unknown-id")
    body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
    r = httpx.request(method, url, json=body, timeout=30)
    assert r.status_code != 405, r.text
    # A 404 here must be the service's (an unknown id, named by its own code), never the router's unknown path.
    if r.status_code == 404:
        error = r.json().get("error") or {}
        assert error.get("code"), r.text
