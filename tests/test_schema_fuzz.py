"""Schemathesis over the running api's own OpenAPI schema: bodies that fit it and bodies that break it,
and not one server error.

The api runs without a worker, so a request that passes every check is enqueued and waits for a
worker that never comes; it answers 504 (`timeout`) after MLXQ_REQUEST_TIMEOUT_S. That one answer is
expected here and allowed by name: every other 5xx fails the run. Bounded and derandomized, so a run
takes about a minute and finds the same cases every time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# The GET operations take no input, so they have no negative cases.
RUNS = [
    ("POST", "/v1/chat/completions", POSITIVE),
    ("POST", "/v1/chat/completions", NEGATIVE),
    ("POST", "/v1/completions", POSITIVE),
    ("POST", "/v1/completions", NEGATIVE),
    ("GET", "/v1/models", POSITIVE),
    ("GET", "/health", POSITIVE),
    ("GET", "/metrics", POSITIVE),
]
EXAMPLES = {"positive": 40, "negative": 50}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "logs").mkdir()
    # The shortest wait: a request that reaches the queue answers 504 at the api's first re-check (~1 s).
    service = Service(service_env(root, root / "no-model", MLXQ_REQUEST_TIMEOUT_S="0.1"), root / "logs")
    service.start(worker=False)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def schema(api: Service) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api.base}/openapi.json")


def server_error(response) -> str | None:
    """Why a response is a server error, or None: the expected 5xx are those of a job no worker runs (a 504 while the
    api waits for one to start, then a 503 `worker_unavailable`)."""
    if response.status_code < 500:
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if (response.status_code, code) in ((504, "timeout"), (503, "worker_unavailable")):
        return None
    if response.status_code == 503 and "No worker of the model" in response.text:  # Anthropic's shape has no code
        return None
    return f"{response.status_code}: {response.text[:500]}"


@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=[f"{m} {p} {mode}" for m, p, mode in RUNS])
def test_no_server_errors(api: Service, schema, method: str, path: str, mode: GenerationMode):
    operation = schema[path][method]

    @settings(
        max_examples=EXAMPLES[str(mode)],
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        # Name the served model where the case has a string there: otherwise nearly every case stops at the
        # 404 for an unknown model and never reaches the checks behind it.
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL_NAME
        response = case.call(base_url=api.base, timeout=30)
        problem = server_error(response)
        assert problem is None, f"{case.method} {case.path} {case.body!r:.2000} -> {problem}"

    run()
    assert api.health()["status"] in ("ok", "degraded")  # the api is still up
