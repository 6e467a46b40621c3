from alembic import context
from sqlalchemy import text

from mlxq.db import make_engine
from mlxq.sql import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    from mlxq.settings import get_settings

    url = get_settings().database_url


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        is_sqlite = connection.dialect.name == "sqlite"
        if not is_sqlite:
            # Several api replicas may start at once against one PostgreSQL.
            connection.execute(text("SELECT pg_advisory_lock(7155001)"))
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            compare_type=True,
            render_as_batch=is_sqlite,
        )
        with context.begin_transaction():
            context.run_migrations()
        if not is_sqlite:
            connection.execute(text("SELECT pg_advisory_unlock(7155001)"))
            connection.commit()
    engine.dispose()


run_migrations_online()
