"""The dashboard in a real browser: Debian's `chromium`, driven headless by the `playwright` package.

`make test` installs chromium with apt-get when it is missing; playwright's own browser download is
never used (`executable_path` points at the system chromium). Fixtures:
- `browser`: one headless chromium for the module.
- `page`: a fresh browser context and page per test (so sessionStorage starts empty).
- `screenshots`: where a test saves its screenshots, kept as artifacts: `$LORAFLEET_SCREENSHOTS_DIR`
  when set (e.g. to refresh docs/images/), else a directory under pytest's tmp dir.
- `sign_in(page, url, key)`: open the dashboard and sign in with an API key through its form.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import APIServer, Tenant, make_api_settings, start_api_server  # noqa: F401

SCREENSHOTS_ENV = "LORAFLEET_SCREENSHOTS_DIR"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `make test` (it installs it) or "
                    "`sudo apt-get install -y chromium`; never `playwright install`.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the dashboard's scripts: {errors}"


@pytest.fixture
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get(SCREENSHOTS_ENV)
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        return Path(chosen)
    return tmp_path_factory.mktemp("screenshots")


def sign_in(page: Any, url: str, key: str) -> None:
    """Open `url`/ (redirected to /ui/), fill the sign-in form and wait until the page shows who signed in."""
    page.goto(url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    from playwright.sync_api import expect

    expect(page.locator("#who")).to_have_text(re.compile(r"operator|tenant key"))
