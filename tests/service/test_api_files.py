"""/v1/files over real HTTP: upload (validated on arrival), list/get/delete/content, size limit, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest


def test_upload_list_retrieve_content_delete_with_the_openai_sdk(api_server, tenant_a, dataset_path):
    client = api_server.openai(tenant_a.api_key)
    with open(dataset_path, "rb") as fh:
        uploaded = client.files.create(file=fh, purpose="fine-tune")
    assert uploaded.id.startswith("file-")
    assert uploaded.object == "file"
    assert uploaded.bytes == dataset_path.stat().st_size
    assert uploaded.filename == "train.jsonl"
    assert uploaded.purpose == "fine-tune"
    assert uploaded.status == "processed"

    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert client.files.content(uploaded.id).read() == dataset_path.read_bytes()

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_broken_dataset_is_refused_with_the_line_numbers(api_server, tenant_a, tmp_path):
    good = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})]
    lines = good * 11
    lines[2] = "{not json"
    lines[6] = json.dumps({"messages": [{"role": "wizard", "content": "x"}]})
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with api_server.client(tenant_a.api_key) as c, open(path, "rb") as fh:
        r = c.post("/v1/files", files={"file": ("broken.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "file"
    assert error["type"] == "invalid_request_error"
    assert "line 3" in error["message"] and "line 7" in error["message"]
    assert {d["line"] for d in error["details"]} >= {3, 7}
    with api_server.client(tenant_a.api_key) as c:
        assert c.get("/v1/files").json()["data"] == []  # nothing stored


def test_oversize_upload_gets_413_naming_the_limit(api_server, tenant_a, tmp_path):
    limit = api_server.settings.max_upload_bytes
    path = tmp_path / "big.jsonl"
    record = json.dumps({"messages": [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y"}]})
    with open(path, "w") as fh:
        while fh.tell() <= limit + 1024:
            fh.write(record + "\n")
    with api_server.client(tenant_a.api_key) as c, open(path, "rb") as fh:
        r = c.post("/v1/files", files={"file": ("big.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["param"] == "file"
    assert str(limit) in error["message"]


def test_oversize_upload_without_content_length_is_cut_off_at_the_limit(api_server, tenant_a):
    limit = api_server.settings.max_upload_bytes
    boundary = "lorafleetboundary"

    def body():  # a generator body: sent chunked, no Content-Length for the server to check up front
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        chunk = b"x" * 65536
        for _ in range(limit // len(chunk) + 4):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/files", content=body(),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "file_too_large"


@pytest.mark.parametrize(
    ("data", "files", "param", "fragment"),
    [
        ({}, {"file": ("t.jsonl", b"{}\n")}, "purpose", "purpose"),
        ({"purpose": "assistants"}, {"file": ("t.jsonl", b"{}\n")}, "purpose", "fine-tune"),
        ({"purpose": "fine-tune"}, None, "file", "file"),
        ({"purpose": "fine-tune"}, {"file": ("t.jsonl", b"")}, "file", "empty"),
    ],
)
def test_bad_upload_forms_name_the_field(api_server, tenant_a, data, files, param, fragment):
    with api_server.client(tenant_a.api_key) as c:
        if files is None:
            r = c.post("/v1/files", data=data, files={"dummy": (None, "x")})
        else:
            r = c.post("/v1/files", data=data, files=files)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"]


def test_json_body_instead_of_multipart_is_a_400(api_server, tenant_a):
    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/files", json={"purpose": "fine-tune"})
    assert r.status_code == 400
    assert "multipart/form-data" in r.json()["error"]["message"]


def test_filename_with_dot_dot_is_reduced_to_its_last_component(api_server, tenant_a, dataset_path):
    with api_server.client(tenant_a.api_key) as c, open(dataset_path, "rb") as fh:
        r = c.post("/v1/files", files={"file": ("../../etc/train.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "train.jsonl"


def test_files_list_paginates_with_after(api_server, tenant_a, make_chat_dataset):
    client = api_server.openai(tenant_a.api_key)
    ids = []
    for i in range(3):
        with open(make_chat_dataset(f"d{i}.jsonl"), "rb") as fh:
            ids.append(client.files.create(file=fh, purpose="fine-tune").id)
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2]
    assert first.has_more is True
    assert [f.id for f in client.files.list(limit=2)] == ids[::-1]  # the SDK follows `after`


def test_multipart_body_cut_off_before_its_closing_boundary_is_a_400_and_nothing_is_stored(
    api_server, tenant_a, make_chat_dataset
):
    dataset = make_chat_dataset("cut.jsonl", 20).read_bytes()
    head = (b"--BB\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            b"--BB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.jsonl\"\r\n"
            b"Content-Type: application/jsonl\r\n\r\n")
    cut_at_a_line_end = dataset[: dataset.index(b"\n", len(dataset) // 2) + 1]  # still a valid dataset
    headers = {"Content-Type": "multipart/form-data; boundary=BB"}
    with api_server.client(tenant_a.api_key) as c:
        for body in (head + cut_at_a_line_end, head + dataset + b"\r\n--BB", head + dataset + b"\r\n--BB\r\n"):
            r = c.post("/v1/files", content=body, headers=headers)
            assert r.status_code == 400, (body[-20:], r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_multipart"
            assert "closing boundary" in error["message"]
        assert c.get("/v1/files").json()["data"] == []
        complete = c.post("/v1/files", content=head + dataset + b"\r\n--BB--\r\n", headers=headers)
        assert complete.status_code == 200, complete.text
        assert complete.json()["bytes"] == len(dataset)
    spool = Path(api_server.settings.data_dir) / "tmp" / "uploads"
    assert list(spool.iterdir()) == []
