"""`mlxq flower`: Flower, Celery's monitor, on the mlxq Celery app and its broker, behind basic auth.

Flower shows what the worker's task events say (task names, states, runtimes, workers; the worker runs
with `-E` and the api sends `task-sent` events). Those events travel on a broadcast channel that only
the Redis broker has; the embedded SQL broker has none, so there Flower could show nothing, and it is
refused with a message that says what to set.

Flower always runs behind basic auth: its web UI lists every task, and its API (unusable without auth
anyway: Flower answers 401 unless `FLOWER_UNAUTHENTICATED_API` is set) can revoke tasks and shut the
worker down. Bound to a loopback address with no password set, a one-time password is made for the run
and printed, as Jupyter does with its token, so `mlxq flower` just works on a laptop while other local
users still cannot drive it; bound to any other address, a password must be set.
"""

from __future__ import annotations

import ipaddress
import secrets
import sys
from typing import NoReturn

from mlxq.settings import Settings

NEEDS_REDIS = (
    "Flower needs the Redis broker: set MLXQ_BROKER_URL=redis://…; the embedded broker has no events Flower can read."
)


def _fail(message: str) -> NoReturn:
    print(f"mlxq flower: {message}", file=sys.stderr)
    raise SystemExit(2)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def credentials(settings: Settings) -> tuple[str, bool]:
    """`user:password` for Flower's `--basic-auth`, and whether the password was made for this run.
    Exits 2 when Flower must not start with these settings."""
    user, password = settings.flower_user, settings.flower_password.get_secret_value()
    # Flower splits `--basic-auth` on commas into several logins, each compared whole (`user:password`):
    # a comma in the password would make each part a login of its own. Basic auth ends the user at the
    # first colon, so a user with one could never log in.
    if not user or ":" in user or "," in user:
        _fail(f"MLXQ_FLOWER_USER {user!r} must be non-empty, without ':' or ','")
    if "," in password:
        _fail("MLXQ_FLOWER_PASSWORD must not contain ','")
    if password:
        return f"{user}:{password}", False
    if not is_loopback(settings.flower_host):
        _fail(
            f"MLXQ_FLOWER_PASSWORD is required when Flower listens on {settings.flower_host} "
            "(only a loopback address may start without one, with a one-time password)"
        )
    return f"{user}:{secrets.token_urlsafe(16)}", True


# The tasks page's columns: Flower's default set plus the arguments, which for mlxq are a short label
# ("job 1234abcd chat 812 chars", mlxq.delivery), never a prompt.
TASKS_COLUMNS = "name,uuid,state,args,received,runtime,worker"


def flower_argv(settings: Settings, basic_auth: str) -> list[str]:
    """The `celery flower` arguments (after the app, which carries the broker URL and the queue)."""
    return [
        "flower",
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        f"--basic-auth={basic_auth}",
        f"--tasks-columns={TASKS_COLUMNS}",
    ]


def run(settings: Settings) -> NoReturn:
    """Serve Flower on `flower_host:flower_port` until stopped (SIGTERM or SIGINT); exit 2 with a
    message when the settings cannot work (the embedded broker, no password on a public address)."""
    if not settings.uses_redis:
        _fail(NEEDS_REDIS)
    basic_auth, made = credentials(settings)
    if made:
        print(
            f"mlxq flower: no MLXQ_FLOWER_PASSWORD set; for this run log in as {settings.flower_user} with "
            f"password {basic_auth.split(':', 1)[1]}",
            file=sys.stderr,
            flush=True,
        )
    from mlxq.celery_app import make_celery

    # In-process, through Celery's own command line with the mlxq app: Flower sees the same broker URL,
    # transport options and queue as the api and worker, and the password never appears in `ps`.
    code = make_celery(settings).start(flower_argv(settings, basic_auth))
    raise SystemExit(code or 0)
