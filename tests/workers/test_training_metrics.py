"""The dispatcher's training series: step times from the reporter's bursts, and the telemetry thread
that turns a running job's metrics events (real Redis streams) into Prometheus series."""

from __future__ import annotations

import socket
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleet.events import EventLog
from workers.metrics import StepClock, TrainingMetrics, TrainingTelemetry, serve_metrics


def _report(clock: StepClock, at: float) -> tuple[float, int] | None:
    timed = clock.row_arrived(at)
    clock.row_done(at + 0.001)  # the reporter's Redis writes
    return timed


def test_step_clock_times_each_burst_over_its_steps_one_burst_late():
    clock = StepClock()
    assert _report(clock, 10.0) is None  # the first burst, after set-up, is never timed
    assert _report(clock, 12.0) is None  # burst 2 starts: 1.999 s of training behind it
    assert _report(clock, 12.0011) is None  # ... and has a second step
    assert _report(clock, 12.0022) is None  # ... and a third
    timed = _report(clock, 15.0)  # burst 3 starts: burst 2 is done
    assert timed is not None and timed[1] == 3
    assert abs(timed[0] - 1.999 / 3) < 1e-9


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_telemetry_turns_a_running_jobs_events_into_series_and_drops_them_when_it_ends(redis_server):
    client = redis_server.client(decode_responses=True)
    running = {"ftjob-m1": "tenant-x"}
    metrics = TrainingMetrics(lambda: dict(running))
    telemetry = TrainingTelemetry(client, metrics, lambda: dict(running), block_ms=200)
    port = _free_port()
    stop_server = serve_metrics(metrics.registry, port, addr="127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    events = EventLog(client)
    try:
        telemetry.poll()  # follows the job from here on (nothing new yet)
        events.append("ftjob-m1", "info", "Step 3", {"step": 3, "tokens_trained": 300, "tokens_per_s": 50.0},
                      type="metrics")
        events.append("ftjob-m1", "info", "Step 5",
                      {"step": 5, "tokens_trained": 500, "tokens_per_s": 60.0, "step_time_s": 0.2,
                       "steps_timed": 2, "checkpoint_upload_s": [1.5]}, type="metrics")
        events.append("ftjob-m1", "info", "not a metrics event", {"step_time_s": 99.0})
        telemetry.poll()
        series = _scrape(url)
        assert series[("lorafleet_dispatcher_jobs_running", ())] == 1
        assert series[("lorafleet_training_step_seconds_count", ())] == 2
        assert abs(series[("lorafleet_training_step_seconds_sum", ())] - 0.4) < 1e-9
        assert series[("lorafleet_checkpoint_upload_seconds_count", ())] == 1
        assert series[("lorafleet_training_tokens_total", ())] == 200  # from the first event it saw
        job = (("job", "ftjob-m1"), ("tenant", "tenant-x"))
        assert series[("lorafleet_training_tokens_per_second", job)] == 60.0

        running.clear()  # the job ended here: its series go
        deadline = time.monotonic() + 10
        while ("lorafleet_training_tokens_per_second", job) in _scrape(url):
            assert time.monotonic() < deadline, "timed out waiting for the ended job's series to be removed"
            telemetry.poll()
        assert _scrape(url)[("lorafleet_dispatcher_jobs_running", ())] == 0
    finally:
        stop_server()
        client.close()
