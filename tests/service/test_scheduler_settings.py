"""The API and the dispatcher hand the scheduler settings (half-life, starvation guard) to Redis."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from fleet import keys
from service.app import create_app
from tests.service.conftest import make_api_settings
from workers.dispatcher import Dispatcher


def test_the_api_and_the_dispatcher_write_the_configured_half_life(tmp_path: Path, redis_server) -> None:
    client = redis_server.client(decode_responses=True)
    settings = make_api_settings(tmp_path, redis_server.url, fair_share_half_life_s=7, starvation_guard_s=42)
    app = create_app(settings)
    with TestClient(app):
        app.state.jobs.snapshot()  # the store's first use writes what it was given
    assert client.hmget(keys.sched_config(), "half_life_ms", "starvation_guard_ms") == ["7000", "42000"]

    client.delete(keys.sched_config())
    Dispatcher(settings.model_copy(update={"fair_share_half_life_s": 9, "starvation_guard_s": 0})).jobs.snapshot()
    assert client.hmget(keys.sched_config(), "half_life_ms", "starvation_guard_ms") == ["9000", "0"]
