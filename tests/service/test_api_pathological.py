"""No request ends the API process: every pathological input class is a 4xx in OpenAI's shape, and the
SAME server (one uvicorn over HTTP) still answers afterwards."""

from __future__ import annotations

import json
import logging
import socket
from urllib.parse import urlsplit

import httpx

from fleet import keys
from fleet.settings import make_redis
from tests.service.conftest import make_api_settings
from workers.datasets import MAX_JSON_DEPTH, MAX_LINE_BYTES

ERROR_KEYS = {"message", "type", "param", "code"}
UPLOAD_LIMIT = 2 * MAX_LINE_BYTES  # room for a line over the line cap that is still under the upload cap
JOBS = "/v1/fine_tuning/jobs"


def _good_line(i: int) -> bytes:
    messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return json.dumps({"messages": messages}).encode()


def _dataset_with(bad_line: bytes) -> bytes:
    """Two good examples, then the bad line as line 3."""
    return b"\n".join([_good_line(0), _good_line(1), bad_line, _good_line(2)]) + b"\n"


def _nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


# (what, raw dataset line 3): each must be refused with 400 naming line 3.
BAD_DATASET_LINES = [
    ("nesting 100 000 deep", _nested(100_000)),
    ("nesting just past the cap", _nested(MAX_JSON_DEPTH + 1)),
    ("nesting near Python's recursion limit", b"[" * 990 + b"]" * 990),
    ("nested objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    ("a line over the line cap", b'{"prompt": "' + b"x" * (MAX_LINE_BYTES + 10) + b'", "completion": "y"}'),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe", "completion": "y"}'),
    ("NUL bytes", b'{"prompt": "a\x00b", "completion": "y"}'),
    ("a bare NUL line", b"\x00\x00\x00"),
    ("a 5000-digit number", b'{"prompt": "a", "completion": "b", "n": ' + b"9" * 5000 + b"}"),
    ("an absurd float", b'{"prompt": "a", "completion": "b", "n": 1e999999}'),
    ("NaN", b'{"prompt": "a", "completion": "b", "n": NaN}'),
]


def _json(depth: int) -> bytes:
    return b'{"model": "tiny-llama", "training_file": "f", "metadata": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"


# (what, method, path, httpx kwargs): JSON routes, headers, content types, numbers.
BAD_REQUESTS = [
    ("JSON body nested 100 000 deep", "POST", JOBS, {"content": b"[" * 100_000 + b"]" * 100_000,
                                                     "headers": {"Content-Type": "application/json"}}),
    ("JSON object nested 5000 deep", "POST", JOBS, {"content": _json(5000),
                                                    "headers": {"Content-Type": "application/json"}}),
    ("JSON nested near the recursion limit", "POST", JOBS, {"content": _json(990),
                                                            "headers": {"Content-Type": "application/json"}}),
    ("deep JSON on the admin route", "POST", "/v1/admin/tenants", {"content": b'{"name":' + b"[" * 50_000,
                                                                   "headers": {"Content-Type": "application/json"}}),
    ("a 5000-digit seed", "POST", JOBS, {"content": b'{"model": "tiny-llama", "training_file": "f", "seed": '
                                         + b"9" * 5000 + b"}", "headers": {"Content-Type": "application/json"}}),
    ("an infinite learning rate", "POST", JOBS, {"content": b'{"model": "tiny-llama", "training_file": "f", '
                                                 b'"hyperparameters": {"learning_rate_multiplier": 1e999}}',
                                                 "headers": {"Content-Type": "application/json"}}),
    ("an infinite alpha", "POST", JOBS, {"content": b'{"model": "tiny-llama", "training_file": "f", '
                                         b'"lora": {"alpha": 1e999}}',
                                         "headers": {"Content-Type": "application/json"}}),
    ("NaN rank", "POST", JOBS, {"content": b'{"model": "tiny-llama", "training_file": "f", "lora": {"r": NaN}}',
                                "headers": {"Content-Type": "application/json"}}),
    ("a huge rank", "POST", JOBS, {"json": {"model": "tiny-llama", "training_file": "f", "lora": {"r": 10**30}}}),
    ("a negative limit", "GET", f"{JOBS}?limit=-99999999999999999999999", {}),
    ("a 5000-digit limit", "GET", f"{JOBS}?limit={'9' * 5000}", {}),
    ("invalid UTF-8 in JSON", "POST", JOBS, {"content": b'{"model": "\xff\xfe"}',
                                            "headers": {"Content-Type": "application/json"}}),
    ("NUL bytes in JSON", "POST", JOBS, {"content": b'{"model": "tiny\x00llama", "training_file": "\x00"}',
                                        "headers": {"Content-Type": "application/json"}}),
    ("XML body", "POST", JOBS, {"content": b"<job/>", "headers": {"Content-Type": "application/xml"}}),
    ("form body on a JSON route", "POST", JOBS, {"data": {"model": "tiny-llama"}}),
    ("JSON on the upload route", "POST", "/v1/files", {"json": {"file": "x", "purpose": "fine-tune"}}),
    ("a garbage Content-Type", "POST", "/v1/files", {"content": b"x", "headers": {"Content-Type": ";;;=\x7f"}}),
    ("multipart without a boundary", "POST", "/v1/adapters", {"content": b"x",
                                                              "headers": {"Content-Type": "multipart/form-data"}}),
    ("a 10 KiB Idempotency-Key", "POST", JOBS, {"json": {"model": "m", "training_file": "f"},
                                                "headers": {"Idempotency-Key": "k" * 10_000}}),
    ("a garbage Last-Event-ID", "GET", f"{JOBS}/ftjob-x/events/stream", {"headers": {"Last-Event-ID": "\x01" * 500}}),
    ("a huge Accept", "GET", f"{JOBS}/ftjob-nope/events", {"headers": {"Accept": "text/event-stream;" * 500}}),
    ("an 8 KiB path", "GET", "/v1/files/" + "a" * 8000, {}),
    ("odd bytes in a cursor", "GET", "/v1/files?after=%00%ff", {}),
]


def _raw_request(url: str, data: bytes) -> bytes:
    """Send raw bytes over one TCP connection and return what came back (for requests httpx won't form);
    a server that refuses mid-request may reset the connection: what arrived before that is returned."""
    parts = urlsplit(url)
    chunks = []
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


def _problem(what: str, r: httpx.Response, *, line: int | None = None) -> str | None:
    """Why `r` is not a clean 4xx in OpenAI's shape (naming `line` if given); None when it is."""
    if not 400 <= r.status_code < 500:
        return f"{what}: status {r.status_code}: {r.text[:200]}"
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{what}: not OpenAI's error shape: {r.text[:200]}"
    if not set(error) >= ERROR_KEYS or not error["message"]:
        return f"{what}: error object lacks {ERROR_KEYS - set(error)}: {error}"
    if line is not None and f"line {line}" not in error["message"]:
        return f"{what}: the message does not name line {line}: {error['message'][:300]}"
    return None


def test_no_pathological_input_crashes_the_server_or_escapes_a_4xx(start_api_server, tmp_path, redis_server):
    server = start_api_server(make_api_settings(tmp_path, redis_server.url, max_upload_bytes=UPLOAD_LIMIT))
    tenant = server.create_tenant("fuzz")
    problems: list[str] = []
    with server.client(tenant.api_key) as c:
        for what, line in BAD_DATASET_LINES:
            r = c.post("/v1/files", files={"file": ("bad.jsonl", _dataset_with(line))}, data={"purpose": "fine-tune"})
            problems.append(_problem(f"dataset with {what}", r, line=3))
        for what, method, path, kwargs in BAD_REQUESTS:
            r = c.request(method, path, **kwargs)
            problems.append(_problem(what, r))

        body = _dataset_with(_good_line(3))
        head = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n\r\n")
        truncated = head + body[: len(body) // 2]
        r = c.post("/v1/files", content=truncated, headers={"Content-Type": "multipart/form-data; boundary=b"})
        problems.append(_problem("truncated multipart", r))

        # A body shorter than its Content-Length: the client hangs up mid-body.
        raw = _raw_request(server.url, b"POST /v1/files HTTP/1.1\r\nHost: x\r\n"
                           + f"Authorization: Bearer {tenant.api_key}\r\n".encode()
                           + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                           + head + b"partial")
        assert not raw.startswith(b"HTTP/1.1 5"), raw[:200]
        # Requests the HTTP server itself refuses (headers over its limit, a negative Content-Length) never
        # reach the app: uvicorn answers 4xx or drops the connection.
        for raw_request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
                            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
            raw = _raw_request(server.url, raw_request)
            assert raw == b"" or raw.startswith(b"HTTP/1.1 4"), raw[:200]

        assert [p for p in problems if p] == []
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200
        ok = c.post("/v1/files", files={"file": ("ok.jsonl", _dataset_with(_good_line(9)))},
                    data={"purpose": "fine-tune"})
        assert ok.status_code == 200, ok.text


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_an_unexpected_error_is_a_logged_500_in_openai_shape_that_never_reaches_uvicorn(api_server, tenant_a,
                                                                                         dataset_path):
    uvicorn_errors = _Records()
    logging.getLogger("uvicorn.error").addHandler(uvicorn_errors)
    try:
        with api_server.client(tenant_a.api_key) as c:
            uploaded = c.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("train.jsonl", dataset_path.read_bytes())}).json()
            # State the code never expects (a corrupted record): a bug path, not bad input.
            client = make_redis(api_server.settings)
            client.set(keys.file(uploaded["id"]), "{not json")
            client.close()
            r = c.get(f"/v1/files/{uploaded['id']}")
            assert r.status_code == 500
            assert r.json()["error"] == {"message": "The server had an error processing your request.",
                                         "type": "server_error", "param": None, "code": None}
            assert c.get("/healthz").json() == {"status": "ok"}
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_errors)
    escaped = [rec for rec in uvicorn_errors.records if "Exception in ASGI application" in rec.getMessage()]
    assert escaped == []
