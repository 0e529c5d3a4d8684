"""/readyz tells anyone that Redis is unreachable, never where Redis lives (that goes to the log)."""

from __future__ import annotations

import json
import logging

import redis

from service.routes.health import readyz
from tests.conftest import free_port


def test_readyz_does_not_show_the_redis_address_but_logs_it(caplog):
    port = free_port()  # nothing listens there
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_connect_timeout=2)
    with caplog.at_level(logging.WARNING, logger="service.routes.health"):
        response = readyz(client)
    body = json.loads(response.body)
    assert response.status_code == 503
    assert body == {"status": "unavailable", "redis": "Redis unreachable"}
    assert str(port) in caplog.text  # the operator still learns which address failed
