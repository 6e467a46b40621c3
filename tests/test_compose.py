"""docker-compose.yml read as data (no Docker engine here): every service, setting and command the code
expects is there, persistence and health checks are wired, and no port is published unauthenticated."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from cli.main import app
from mlxq.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`, and `$$` (a literal $).
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# The secrets a deployment must supply: compose refuses to start without them.
SECRETS = {"MLXQ_API_KEYS", "MLXQ_FLOWER_PASSWORD", "REDIS_PASSWORD", "POSTGRES_PASSWORD"}
FAKE = {name: f"{name.lower().replace('_', '-')}-value" for name in SECRETS}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What compose makes of a value, given the shell's variables (no defaults for a required one)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, op, arg = m[1], m[2] or "", m[3] or ""
        if name in env and (env[name] or ":" not in op):
            return env[name]
        if op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg if op.endswith("-") else ""

    return VAR.sub(one, value)


def variables(value: Any, found: dict[str, str] | None = None) -> dict[str, str]:
    """Every variable the file interpolates, with its operator (`:?` required, `:-` defaulted, `` plain)."""
    found = {} if found is None else found
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            variables(item, found)
    elif isinstance(value, str):
        for m in VAR.finditer(value):
            if m[1]:
                found.setdefault(m[1], m[2] or "")
    return found


def env_of(name: str, shell: dict[str, str] = FAKE) -> dict[str, str]:
    env = SERVICES[name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in interpolate(env, shell).items()}


def settings_of(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the service's process would build from its environment."""
    for key in [k for k in os.environ if k.startswith("MLXQ_")]:
        monkeypatch.delenv(key)
    for key, value in env_of(name).items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def mounts(name: str) -> dict[str, str]:
    """Container path -> volume name (named volumes only)."""
    out = {}
    for spec in SERVICES[name].get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def published(name: str) -> list[tuple[str, int]]:
    """(host address, container port) of each published port."""
    out = []
    for spec in SERVICES[name].get("ports", []):
        parts = str(spec).split(":")
        host = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((host, int(parts[-1])))
    return out


def test_services_and_commands():
    assert set(SERVICES) == {"redis", "postgres", "api", "worker", "flower"}
    assert SERVICES["api"]["command"] == ["mlxq", "api"]
    assert SERVICES["worker"]["command"] == ["mlxq", "worker"]
    # Flower through the mlxq app (`mlxq flower`): the same broker URL, queue and transport options.
    assert SERVICES["flower"]["command"] == ["mlxq", "flower"]
    commands = typer.main.get_command(app).commands
    for name, service in SERVICES.items():
        command = service.get("command")
        if command and command[0] == "mlxq":
            assert command[1] in commands, f"{name}: `mlxq {command[1]}` is not a command of cli.main"


def test_images_carry_the_extras_they_need():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ARG EXTRAS" in (ROOT / "Dockerfile").read_text()
    wanted = {"api": "", "worker": "worker", "flower": "flower"}
    for name, extra in wanted.items():
        build = SERVICES[name]["build"]
        args = build.get("args", {}) if isinstance(build, dict) else {}
        assert args.get("EXTRAS", "") == extra
        assert not extra or extra in extras


def test_every_mlxq_variable_is_a_setting():
    names = set(variables(COMPOSE))
    for service in SERVICES.values():
        env = service.get("environment") or {}
        names |= set(env if isinstance(env, dict) else (item.split("=", 1)[0] for item in env))
    unknown = sorted(n for n in names if n.startswith("MLXQ_") and n[5:].lower() not in Settings.model_fields)
    assert not unknown, f"not fields of mlxq.settings.Settings: {unknown}"


def test_secrets_are_required_and_nothing_else_is():
    required = {name for name, op in variables(COMPOSE).items() if op.endswith("?")}
    assert required == SECRETS
    for secret in SECRETS:
        with pytest.raises(KeyError, match=secret):
            for name in SERVICES:
                interpolate(SERVICES[name], {k: v for k, v in FAKE.items() if k != secret})


def test_one_broker_and_database_for_all(monkeypatch: pytest.MonkeyPatch):
    seen = {name: settings_of(name, monkeypatch) for name in ("api", "worker", "flower")}
    for name, settings in seen.items():
        assert settings.uses_redis, name
        assert settings.broker_url == f"redis://:{FAKE['REDIS_PASSWORD']}@redis:6379/0"
        assert settings.database_url == f"postgresql+psycopg://mlxq:{FAKE['POSTGRES_PASSWORD']}@postgres:5432/mlxq"
        assert (settings.queue, settings.redis_prefix) == (seen["worker"].queue, seen["worker"].redis_prefix)
    # The api keys cache entries by the weights it sees: the same model as the worker's.
    assert (seen["api"].model, seen["api"].model_name) == (seen["worker"].model, seen["worker"].model_name)
    assert env_of("redis")["REDISCLI_AUTH"] == FAKE["REDIS_PASSWORD"]
    assert env_of("postgres")["POSTGRES_PASSWORD"] == FAKE["POSTGRES_PASSWORD"]


def test_only_authenticated_ports_are_published(monkeypatch: pytest.MonkeyPatch):
    assert {name for name in SERVICES if SERVICES[name].get("ports")} == {"api", "flower"}
    api = settings_of("api", monkeypatch)
    assert published("api") == [("0.0.0.0", api.port)] and api.host == "0.0.0.0"
    assert SERVICES["api"]["environment"]["MLXQ_API_KEYS"].startswith("${MLXQ_API_KEYS:?")
    flower = settings_of("flower", monkeypatch)
    # Basic auth crosses the wire in clear: Flower is published on the host's loopback only.
    assert published("flower") == [("127.0.0.1", flower.flower_port)] and flower.flower_host == "0.0.0.0"
    assert SERVICES["flower"]["environment"]["MLXQ_FLOWER_PASSWORD"].startswith("${MLXQ_FLOWER_PASSWORD:?")
    assert flower.flower_password.get_secret_value() == FAKE["MLXQ_FLOWER_PASSWORD"]


def test_health_checks_and_start_order():
    for name, service in SERVICES.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        if test[:3] == ["CMD", "python", "-c"]:
            compile(interpolate(test[3], FAKE), f"{name} healthcheck", "exec")
    healthy = {"condition": "service_healthy"}
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"] == {"redis": healthy, "postgres": healthy}
    assert SERVICES["flower"]["depends_on"] == {"redis": healthy}
    # `redis-cli ping` exits 0 when refused (NOAUTH): the check must look for PONG.
    assert "PONG" in " ".join(SERVICES["redis"]["healthcheck"]["test"])
    assert "/health" in SERVICES["api"]["healthcheck"]["test"][-1]
    assert f":{Settings(_env_file=None).flower_port}/healthcheck" in SERVICES["flower"]["healthcheck"]["test"][-1]


def test_persistence(monkeypatch: pytest.MonkeyPatch):
    assert set(COMPOSE["volumes"]) == {"pgdata", "redis", "data", "models", "prefix-cache"}
    redis_command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert mounts("redis") == {"/data": "redis"}
    assert mounts("postgres") == {"/var/lib/postgresql/data": "pgdata"}
    worker = settings_of("worker", monkeypatch)
    data = str(worker.data_dir)
    # The worker keeps its prefix cache in <data dir>/prefix_cache (worker/prefix_saves.py).
    assert 'data_dir / "prefix_cache"' in (ROOT / "worker" / "prefix_saves.py").read_text()
    assert mounts("worker") == {
        data: "data",
        str(worker.builtin_model_dir.parent): "models",
        f"{data}/prefix_cache": "prefix-cache",
    }
    assert mounts("api") == {data: "data", str(worker.builtin_model_dir.parent): "models"}
    assert SERVICES["api"]["volumes"][-1].endswith(":ro")
    used = {v for name in SERVICES for v in mounts(name).values()}
    assert used == set(COMPOSE["volumes"])


def test_the_image_copies_every_package_the_project_installs():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert {p.rstrip("*") for p in packages} <= copied  # else `mlxq` in the image cannot import its CLI
