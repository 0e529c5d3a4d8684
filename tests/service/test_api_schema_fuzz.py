"""The live OpenAPI schema is the contract: schemathesis fuzzes every operation of one running server
with a tenant key and finds no server error and no answer the schema does not describe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Examples per operation: ~35 operations x 40 cases takes ~30 s here; the subprocess limit bounds it.
EXAMPLES_PER_OPERATION = 40
RUN_TIMEOUT_S = 150
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def _schemathesis() -> str:
    beside_python = Path(sys.executable).with_name("schemathesis")
    found = str(beside_python) if beside_python.exists() else shutil.which("schemathesis")
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    return found


@pytest.mark.slow
def test_openapi_schema_describes_every_answer_and_nothing_is_a_server_error(api_server, tenant_a, tmp_path):
    with api_server.client(tenant_a.api_key) as c:
        assert c.get("/openapi.json").status_code == 200
    command = [
        _schemathesis(), "run", f"{api_server.url}/openapi.json",
        "--header", f"Authorization: Bearer {tenant_a.api_key}",
        "--checks", CHECKS,
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--phases", "examples,coverage,fuzzing",
        "--workers", "1",
        "--generation-database", "none",
        "--request-timeout", "30",
        "--no-color",
    ]
    try:
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"schemathesis did not finish within {RUN_TIMEOUT_S} s:\n{(e.stdout or b'')[-4000:]!r}")
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failure" not in run.stdout.split("SUMMARY")[-1], run.stdout[-4000:]

    with api_server.client(tenant_a.api_key) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ok", "redis": "ok"}
        assert c.get("/v1/files").status_code == 200
