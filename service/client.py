"""A small HTTP client for the lorafleet API (httpx), used by the CLI; errors come back as `APIClientError`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["APIClientError", "LorafleetClient", "ServerEvent", "parse_sse"]


class APIClientError(Exception):
    """The server answered an error (OpenAI's shape) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        status = f"HTTP {self.status}: " if self.status else ""
        return f"{status}{self.message}{where}"


@dataclass
class ServerEvent:
    """One Server-Sent Event: `event` name (default "message"), `data` text and `id`."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(lines: Iterator[str]) -> Iterator[ServerEvent]:
    """Server-Sent Events from a text/event-stream's lines (comments and keep-alives skipped)."""
    event, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                yield ServerEvent(event=event, data="\n".join(data), id=event_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
    if data:
        yield ServerEvent(event=event, data="\n".join(data), id=event_id)


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise APIClientError(response.status_code, error["message"], param=error.get("param"),
                             code=error.get("code"))
    except (ValueError, KeyError, TypeError):
        raise APIClientError(response.status_code, response.text[:500] or response.reason_phrase) from None


class LorafleetClient:
    """Calls the API at `base_url` (e.g. http://127.0.0.1:8000) with `api_key` as the Bearer token."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LorafleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; the decoded JSON body, or APIClientError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise APIClientError(
                0, f"cannot reach the lorafleet API at {self.base_url} ({e}); is `lorafleet up` running?"
            ) from e
        _raise_for_error(response)
        return response.json()

    # --- admin --------------------------------------------------------------------------------------
    def create_tenant(self, name: str) -> dict:
        return self.request("POST", "/v1/admin/tenants", json={"name": name})

    def list_tenants(self) -> dict:
        return self.request("GET", "/v1/admin/tenants")

    def issue_key(self, tenant_id: str, *, role: str = "member") -> dict:
        return self.request("POST", f"/v1/admin/tenants/{tenant_id}/keys", json={"role": role})

    def revoke_key(self, key_id: str) -> dict:
        return self.request("DELETE", f"/v1/admin/keys/{key_id}")

    def get_quota(self, tenant_id: str) -> dict:
        return self.request("GET", f"/v1/admin/tenants/{tenant_id}/quota")

    def set_quota(self, tenant_id: str, quota: dict) -> dict:
        return self.request("PUT", f"/v1/admin/tenants/{tenant_id}/quota", json=quota)

    def reset_quota(self, tenant_id: str) -> dict:
        return self.request("DELETE", f"/v1/admin/tenants/{tenant_id}/quota")

    def cluster(self) -> dict:
        return self.request("GET", "/v1/admin/cluster")

    # --- files --------------------------------------------------------------------------------------
    def upload_file(self, path: Path, *, purpose: str = "fine-tune") -> dict:
        with open(path, "rb") as fh:
            return self.request("POST", "/v1/files", files={"file": (path.name, fh)}, data={"purpose": purpose})

    def list_files(self) -> dict:
        return self.request("GET", "/v1/files")

    # --- jobs ---------------------------------------------------------------------------------------
    def create_job(self, body: dict, *, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/fine_tuning/jobs", json=body, headers=headers)

    def estimate_job(self, body: dict) -> dict:
        """What the job in `body` (create's body) would cost; nothing is created."""
        return self.request("POST", "/v1/fine_tuning/jobs/estimate", json=body)

    def list_jobs(self, *, limit: int = 20, after: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self.request("GET", "/v1/fine_tuning/jobs", params=params)

    def get_job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def job_action(self, job_id: str, action: str) -> dict:
        """POST /cancel, /pause or /resume."""
        return self.request("POST", f"/v1/fine_tuning/jobs/{job_id}/{action}")

    def stream_job(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """The job's live SSE stream: its events, a `job` event on each change, `end` when finished."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        try:
            with self._http.stream(
                "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}, headers=headers,
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if not response.is_success:
                    response.read()
                    _raise_for_error(response)
                yield from parse_sse(response.iter_lines())
        except httpx.TransportError as e:
            raise APIClientError(0, f"lost the event stream from {self.base_url} ({e})") from e

    # --- adapters -----------------------------------------------------------------------------------
    def list_adapters(self) -> dict:
        return self.request("GET", "/v1/adapters")

    def list_versions(self, name: str) -> dict:
        return self.request("GET", f"/v1/adapters/{name}/versions")

    def get_version(self, name: str, version: str) -> dict:
        """One version with its rank report and manifest; `version` is "vN", "N" or "latest"."""
        return self.request("GET", f"/v1/adapters/{name}/versions/{version}")

    def download_version(self, name: str, version: str, out: Path) -> int:
        """Stream the version's archive to `out`; the number of bytes written."""
        written = 0
        try:
            with self._http.stream("GET", f"/v1/adapters/{name}/versions/{version}/download") as response:
                if not response.is_success:
                    response.read()
                    _raise_for_error(response)
                with open(out, "wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                        written += len(chunk)
        except httpx.TransportError as e:
            raise APIClientError(0, f"download from {self.base_url} failed ({e})") from e
        return written
