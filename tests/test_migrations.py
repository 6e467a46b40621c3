"""The migrations are the schema: from empty to head they build exactly the SQL metadata, and back."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from mlxq.db import MIGRATIONS_DIR
from mlxq.sql import Base


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_from_empty_matches_the_models_and_downgrades_to_base(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
):
    url = f"sqlite:///{tmp_path / 'm.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        command.downgrade(cfg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
