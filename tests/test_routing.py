"""The routing decision (mlxq.delivery.choose) and what it matches on (mlxq.keys.prefix_hashes), alone."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxq.celery_app import make_celery
from mlxq.db import make_engine, make_sessionmaker, upgrade
from mlxq.delivery import Delivery, WorkerView, choose, session_of
from mlxq.keys import prefix_hashes
from mlxq.repos import workers
from mlxq.request import Request
from mlxq.settings import Settings
from mlxq.states import RouteReason
from tests.factories import job_spec

SYSTEM = {"role": "system", "content": "You are a coding agent."}


def chat(*turns: str) -> dict:
    messages = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}]}


def view(name: str, load: int = 0, holds: dict | None = None) -> WorkerView:
    return WorkerView(name, "m", load, frozenset(prefix_hashes("chat", holds) if holds else ()))


def test_a_later_turn_repeats_every_earlier_boundary():
    first, later = prefix_hashes("chat", chat("hi")), prefix_hashes("chat", chat("hi", "hello", "more"))
    assert later[: len(first)] == first and len(later) == len(first) + 2
    # Tools and model are part of every boundary: another tool set is another prompt.
    assert prefix_hashes("chat", {**chat("hi"), "tools": []})[0] != first[0]
    assert prefix_hashes("chat", {**chat("hi"), "model": "other"})[0] != first[0]


def test_the_worker_holding_the_longest_prefix_wins_unless_it_is_overloaded():
    turn = chat("a", "b", "c")
    holds_two, holds_one = view("w1", holds=chat("a", "b")), view("w2", holds=chat("a"))
    route = choose([holds_one, holds_two], prefix_hashes("chat", turn), "s", margin=4)
    assert (route.worker, route.reason, route.matched) == ("w1", RouteReason.PREFIX, 3)
    busy = view("w1", load=9, holds=chat("a", "b"))
    route = choose([holds_one, busy], prefix_hashes("chat", turn), "s", margin=4)
    assert (route.worker, route.reason) == ("w2", RouteReason.BALANCE)  # 9 > 0 + 4
    within = view("w1", load=4, holds=chat("a", "b"))
    assert choose([holds_one, within], prefix_hashes("chat", turn), "s", margin=4).worker == "w1"
    assert choose([], prefix_hashes("chat", turn), "s", margin=4).reason == RouteReason.UNROUTED


def test_a_session_sticks_to_one_worker_and_a_joining_worker_takes_only_its_share():
    names = ["w1", "w2"]
    sessions = [f"session-{i}" for i in range(300)]
    before = {s: choose([view(n) for n in names], [], s, margin=4).worker for s in sessions}
    assert all(choose([view(n) for n in reversed(names)], [], s, 4).worker == before[s] for s in sessions)
    assert 0.35 < sum(w == "w1" for w in before.values()) / len(sessions) < 0.65
    after = {s: choose([view(n) for n in [*names, "w3"]], [], s, margin=4).worker for s in sessions}
    moved = [s for s in sessions if after[s] != before[s]]
    assert all(after[s] == "w3" for s in moved)  # only to the new worker, never between the old ones
    assert 0.2 < len(moved) / len(sessions) < 0.45  # about its third


def test_a_session_is_the_clients_id_or_the_conversations_opening():
    assert session_of("chat", chat("hi"), "pck") == "pck"
    # Without one, the opening through the first user turn: later turns keep it, another task does not.
    assert session_of("chat", chat("hi"), None) == session_of("chat", chat("hi", "hello", "more"), None)
    assert session_of("chat", chat("hi"), None) != session_of("chat", chat("other task"), None)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Delivery]:
    """A Delivery over a fresh SQLite database where workers w1 and w2 of model "m" have just beaten (nothing cached)."""
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'q.sqlite'}")
    upgrade(settings)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as s:
            for name in ("w1", "w2"):
                workers.heartbeat(session=s, name=name, model="m", model_loaded=True, error=None, started_at=0.0)
        yield Delivery(sessions, make_celery(settings), settings)
    finally:
        engine.dispose()


def test_a_turn_sent_before_the_workers_next_heartbeat_finds_the_worker_its_last_turn_went_to(two_workers: Delivery):
    delivery = two_workers
    spec = dataclasses.replace(job_spec("k"), request=Request.read(chat("task")))
    first = delivery.route(spec).route
    assert first is not None and first.reason == RouteReason.SESSION
    # The next turn comes at once, before either worker's heartbeat publishes anything, under session ids
    # half of which rendezvous hashing would send to the other worker: the prefix decides.
    later = dataclasses.replace(spec, request=Request.read(chat("task", "done", "next")))
    routes = [delivery.route(dataclasses.replace(later, session=f"s{i}")).route for i in range(20)]
    assert {(r.worker, r.reason) for r in routes if r is not None} == {(first.worker, RouteReason.PREFIX)}


def test_a_sessions_turns_that_have_ended_are_not_load_before_the_next_heartbeat(two_workers: Delivery):
    delivery = two_workers
    margin = Settings().route_load_margin
    base = dataclasses.replace(job_spec("k"), session="one-session")
    # Unrelated first turns of one session, each answered before the next is sent, and no heartbeat between:
    # more of them than the load margin, all on the session's worker.
    routes = []
    for n in range(margin + 3):
        spec = delivery.route(dataclasses.replace(base, request=Request.read(chat(f"question {n}"))))
        job_id = uuid.uuid4().hex
        delivery.admitted(job_id, spec, new=True, waiting_for_room=False)
        routes.append(spec.route)
        delivery.ended(job_id)
    assert {(r.worker, r.reason) for r in routes if r is not None} == {(routes[0].worker, RouteReason.SESSION)}
    # Turns still running are load: past the margin, the next goes to the other worker.
    for n in range(margin + 1):
        spec = delivery.route(dataclasses.replace(base, request=Request.read(chat(f"running {n}"))))
        delivery.admitted(uuid.uuid4().hex, spec, new=True, waiting_for_room=False)
    spec = delivery.route(dataclasses.replace(base, request=Request.read(chat("one more"))))
    assert spec.route is not None and spec.route.reason == RouteReason.BALANCE
    assert spec.route.worker != routes[0].worker
