"""A tenant's dashboard in chromium over a real stack: API, Redis, Ray and a `lorafleet worker` dispatcher.

The job page's loss curve is fed by the job's SSE stream; the test watches it gain points while the
job trains, pauses, resumes and cancels another job with the page's buttons, and opens the published
adapter's manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.catalog import BaseModelSpec
from fleet.settings import Settings
from tests.browser.conftest import sign_in
from tests.reliability.conftest import wait_for
from tests.service.conftest import APIServer, make_api_settings
from tests.service.test_end_to_end import Dispatchers
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(tmp_path: Path, redis_server: Any, tiny_model_dir: Path, ray_cluster: None,
          start_api_server: Callable[[Settings], APIServer]) -> Iterator[tuple[APIServer, Dispatchers]]:
    import ray

    tiny = BaseModelSpec(path=str(tiny_model_dir), quantization="none", max_rank=64)
    settings = make_api_settings(tmp_path, redis_server.url, catalog={"tiny-llama": tiny}, lease_ms=3000,
                                 heartbeat_ms=250, max_upload_bytes=64 * 1024 * 1024)
    dispatchers = Dispatchers(settings, ray.get_runtime_context().gcs_address, tmp_path)
    yield start_api_server(settings), dispatchers
    dispatchers.stop_all()


def _points(page: Any, series: str) -> int:
    line = page.locator(f'#loss-chart polyline[data-series="{series}"]')
    return int(line.get_attribute("data-points")) if line.count() else 0


def test_tenant_watches_loss_curve_grow_and_pauses_resumes_cancels_a_job_from_the_page(
        stack: tuple[APIServer, Dispatchers], page: Any, screenshots: Path, tmp_path: Path) -> None:
    server, dispatchers = stack
    tenant = server.create_tenant("team-nlp")
    client = server.openai(tenant.api_key)
    train, val = write_synthetic_splits(tmp_path / "data", n_train=120, n_val=8, seed=3)
    train_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    val_id = client.files.create(file=val.open("rb"), purpose="fine-tune").id

    # A high learning rate, so that the curve in the screenshot visibly falls within 3 short epochs.
    hyperparameters = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 20}

    def create(suffix: str) -> str:  # short examples packed into blocks: ~10 steps an epoch, a validation each
        return client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=train_id, validation_file=val_id, suffix=suffix, seed=7,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}).id

    watched, doomed = create("reverser"), create("doomed")
    sign_in(page, server.url, tenant.api_key)
    rows = page.locator("#jobs tbody tr")
    wait_for(lambda: rows.count() == 2, "both jobs in the jobs list")
    assert "queued" in page.locator(f'tr[data-job="{doomed}"]').inner_text()

    # Pause, resume, then cancel the second job from its page, before any dispatcher runs.
    page.locator(f'a[href="#/jobs/{doomed}"]').click()
    page.get_by_role("button", name="Pause").click()
    page.locator("#job-status").get_by_text("paused").wait_for()
    page.get_by_role("button", name="Resume").click()
    page.locator("#job-status").get_by_text("queued").wait_for()
    page.get_by_role("button", name="Cancel").click()
    page.locator("#job-status").get_by_text("cancelled").wait_for()
    assert client.fine_tuning.jobs.retrieve(doomed).status == "cancelled"
    assert page.get_by_role("button", name="Cancel").is_disabled()
    page.screenshot(path=str(screenshots / "dashboard-job-cancelled.png"), full_page=True)

    # Open the first job's page while it waits, then start a dispatcher and watch its curve grow.
    page.goto(f"{server.url}/ui/#/jobs/{watched}")
    page.locator("#loss-chart").wait_for()
    assert _points(page, "train_loss") == 0
    dispatchers.start("dispatcher-1")
    first = wait_for(lambda: _points(page, "train_loss"), "the first training loss point on the page")
    wait_for(lambda: _points(page, "train_loss") > first, f"the loss curve to grow past {first} point(s)")
    page.locator("#job-status").get_by_text("succeeded").wait_for(timeout=180_000)
    verdict = page.locator("#job-rank-report #rank-verdict")  # the published version's rank report
    verdict.wait_for()
    assert verdict.inner_text().startswith(("rank looks", "adapter is untrained")), verdict.inner_text()
    steps = client.fine_tuning.jobs.retrieve(watched).model_extra["progress"]["total_steps"]
    assert steps >= 20 and _points(page, "train_loss") == steps  # every step is logged on CPU
    assert _points(page, "val_loss") >= 3  # before training, then once per epoch
    assert page.locator("#checkpoints tbody tr").count() >= 1
    assert page.locator("#events li").count() > steps
    page.screenshot(path=str(screenshots / "dashboard-job.png"), full_page=True)

    # The list shows both outcomes; the adapter page shows the published version's manifest.
    page.get_by_role("link", name="Jobs", exact=True).click()
    page.locator("#status-filter").select_option("succeeded")
    wait_for(lambda: rows.count() == 1 and watched in rows.first.inner_text(), "the status filter")
    page.get_by_role("link", name="Adapters").click()
    page.get_by_role("link", name="reverser").click()
    manifest = page.locator("#manifest")
    manifest.wait_for()
    assert "tiny-llama" in manifest.inner_text() and "adapter_model.safetensors" in manifest.inner_text()
    assert watched in manifest.inner_text()
    assert "q_proj" in manifest.locator("#lora-config").inner_text()  # the LoRA config, field by field
    report_rows = manifest.locator("#rank-report tbody tr")  # one per adapted module: q_proj, v_proj per layer
    assert report_rows.count() >= 2 and "self_attn.q_proj" in report_rows.first.inner_text()
    assert "[object" not in manifest.inner_text()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download").click()
    assert download.value.suggested_filename == "reverser-v1.tar.gz"
    page.screenshot(path=str(screenshots / "dashboard-adapter.png"), full_page=True)
