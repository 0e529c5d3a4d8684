"""A rank sweep on the dashboard (no worker): the parent's page lists its children by rank, each a link to
its own page, which links back to the sweep."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.settings import Settings
from tests.browser.conftest import sign_in
from tests.service.conftest import APIServer, make_api_settings, write_chat_dataset


@pytest.fixture
def server(tmp_path: Path, redis_server: Any, start_api_server: Callable[[Settings], APIServer]) -> APIServer:
    return start_api_server(make_api_settings(tmp_path, redis_server.url))


def test_a_sweeps_page_lists_its_children_and_each_child_links_back(server: APIServer, page: Any,
                                                                     screenshots: Path, tmp_path: Path) -> None:
    tenant = server.create_tenant("team-ranks")
    openai = server.openai(tenant.api_key)
    upload = lambda name, n: openai.files.create(  # noqa: E731
        file=write_chat_dataset(tmp_path / name, n=n).open("rb"), purpose="fine-tune").id
    parent = openai.fine_tuning.jobs.create(model="tiny-llama", training_file=upload("train.jsonl", 12),
                                            validation_file=upload("val.jsonl", 4),
                                            extra_body={"rank_sweep": [8, 16, 32]})
    children = parent.model_extra["rank_sweep"]["children"]

    sign_in(page, server.url, tenant.api_key)
    page.goto(f"{server.url}/ui/#/jobs/{parent.id}")
    rows = page.locator("#rank-sweep tbody tr")
    rows.first.wait_for()
    assert rows.count() == 3
    for row, child in zip([rows.nth(i) for i in range(3)], children, strict=True):
        text = row.inner_text()
        assert str(child["rank"]) in text and child["id"] in text and "queued" in text
    assert "r=8, 16, 32 (a rank sweep)" in page.locator("#job-summary").inner_text()
    assert page.get_by_role("button", name="Pause").is_disabled()  # its children pause, not the sweep
    page.screenshot(path=str(screenshots / "dashboard-rank-sweep.png"), full_page=True)

    page.locator(f'#rank-sweep a[href="#/jobs/{children[1]["id"]}"]').click()
    page.locator("#job-summary").get_by_text("r=16").wait_for()
    page.locator(f'#job-summary a[href="#/jobs/{parent.id}"]').wait_for()  # back to its sweep
