"""Fixtures on real parts: SQLite, PostgreSQL, Redis, the real SmolLM2 and a tiny random llama.

Off CI a missing server skips with a reason; under CI=true it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlxq.procs import Service
from tests.factories import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("MLXQ_TEST_MODELS", ROOT / ".data" / "models"))
PG_ADMIN = os.environ.get("MLXQ_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("MLXQ_TEST_REDIS", "redis://127.0.0.1:6379")
MODEL_NAME = "SmolLM2-135M-Instruct"


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"required service unavailable under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from worker.pull import pull_builtin

    return pull_builtin(MODEL_CACHE / MODEL_NAME)


@pytest.fixture(scope="session")
def tiny_model(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database owned by this test, dropped afterwards."""
    import psycopg

    name = f"mlxq_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def redis_url() -> Iterator[tuple[str, str]]:
    """A Redis db number plus a key prefix / queue name owned by this test; its keys are removed after."""
    import redis

    db = 1 + uuid.uuid4().int % 15
    url = f"{REDIS}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS}: {exc}")
    prefix = f"mlxqtest{uuid.uuid4().hex[:10]}"
    try:
        yield url, prefix
    finally:
        for pattern in (f"{prefix}*", f"*{prefix}*"):
            keys = list(client.scan_iter(match=pattern))
            if keys:
                client.delete(*keys)
        client.close()


def service_env(tmp_path: Path, model: Path, **extra: str) -> dict[str, str]:
    env = {
        "MLXQ_DATA_DIR": str(tmp_path / "data"),
        "MLXQ_MODEL": str(model),
        "MLXQ_MODEL_NAME": MODEL_NAME,
        "MLXQ_HEARTBEAT_S": "0.5",
    }
    env.update(extra)
    return env


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator:
    services: list[Service] = []

    def make(env: dict[str, str]) -> Service:
        log_dir = tmp_path / f"logs{len(services)}"
        log_dir.mkdir()
        svc = Service(env, log_dir)
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.stop()


@pytest.fixture(scope="session")
def family_models(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny model of tests.families.MODELS named by its test id, built once per session."""
    from tests.families import MODELS, build

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, quantize = MODELS[name]
            built[name] = build(family, tmp_path_factory.mktemp("families") / name, smollm2, quantize=quantize)
        return built[name]

    return get


@pytest.fixture(scope="session")
def family_model(request: pytest.FixtureRequest, family_models: Callable[[str], Path]) -> Path:
    """One family's tiny model: parametrize with `indirect=["family_model"]` and test ids of tests.families.MODELS."""
    return family_models(request.param)
