"""/v1/adapters and /v1/models over real HTTP: import a PEFT adapter, list, manifest, download, delete."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import openai
import pytest


def import_adapter(client, name: str, archive: bytes, filename: str = "adapter.tar.gz"):
    return client.post("/v1/adapters", files={"file": (filename, archive)}, data={"name": name})


def test_import_list_manifest_download_and_delete(api_server, tenant_a, peft_adapter_dir, peft_adapter_archive,
                                                  tmp_path):
    with api_server.client(tenant_a.api_key) as c:
        first = import_adapter(c, "support-bot", peft_adapter_archive)
        assert first.status_code == 200, first.text
        assert first.json()["id"] == "support-bot:v1"
        second = import_adapter(c, "support-bot", peft_adapter_archive)
        assert second.json()["id"] == "support-bot:v2"

        adapters = c.get("/v1/adapters").json()["data"]
        assert [(a["name"], a["latest_ref"], a["version_count"]) for a in adapters] == [
            ("support-bot", "support-bot:v2", 2)]
        versions = c.get("/v1/adapters/support-bot/versions").json()["data"]
        assert [v["id"] for v in versions] == ["support-bot:v2", "support-bot:v1"]

        version = c.get("/v1/adapters/support-bot/versions/v1").json()
        manifest = version["manifest"]
        assert manifest["ref"] == "support-bot:v1" and manifest["source"] == "import"
        files = {f["path"]: f for f in manifest["files"]}
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert files[name]["sha256"] == hashlib.sha256((peft_adapter_dir / name).read_bytes()).hexdigest()
        assert c.get("/v1/adapters/support-bot/versions/1/manifest").json() == manifest
        assert c.get("/v1/adapters/support-bot/versions/latest").json()["id"] == "support-bot:v2"

        download = c.get("/v1/adapters/support-bot/versions/v1/download")
        assert download.status_code == 200
        assert "support-bot-v1.tar.gz" in download.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "out", filter="data")
        out = tmp_path / "out" / "support-bot-v1"
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / name).read_bytes() == (peft_adapter_dir / name).read_bytes()
        assert json.loads((out / "manifest.json").read_text())["ref"] == "support-bot:v1"

        as_zip = c.get("/v1/adapters/support-bot/versions/v2/download", params={"format": "zip"})
        assert "support-bot-v2/adapter_model.safetensors" in zipfile.ZipFile(io.BytesIO(as_zip.content)).namelist()

        deleted = c.delete("/v1/adapters/support-bot/versions/v2")
        assert deleted.json() == {"id": "support-bot:v2", "object": "adapter.version", "deleted": True}
        assert c.get("/v1/adapters/support-bot/versions/v2").status_code == 404
        assert c.get("/v1/adapters/support-bot/versions/v2/download").status_code == 404
        assert [v["id"] for v in c.get("/v1/adapters/support-bot/versions").json()["data"]] == ["support-bot:v1"]
        third = import_adapter(c, "support-bot", peft_adapter_archive)
        assert third.json()["id"] == "support-bot:v3"  # a deleted number is never reused


def test_models_lists_base_models_and_the_tenants_adapters(api_server, tenant_a, tenant_b, peft_adapter_archive):
    with api_server.client(tenant_a.api_key) as c:
        assert import_adapter(c, "helper", peft_adapter_archive).status_code == 200
    client = api_server.openai(tenant_a.api_key)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-llama", "helper:v1"}
    assert models["tiny-llama"].owned_by == "lorafleet"
    assert models["tiny-llama"].model_extra["max_rank"] == 64
    assert models["helper:v1"].owned_by == tenant_a.id
    assert client.models.retrieve("helper:v1").id == "helper:v1"
    assert client.models.retrieve("tiny-llama").object == "model"

    other = api_server.openai(tenant_b.api_key)
    assert {m.id for m in other.models.list()} == {"tiny-llama"}
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve("helper:v1")
    with pytest.raises(openai.NotFoundError):
        other.models.delete("helper:v1")

    assert client.models.delete("helper:v1").deleted is True
    assert {m.id for m in client.models.list()} == {"tiny-llama"}
    with pytest.raises(openai.BadRequestError):
        client.models.delete("tiny-llama")


def test_import_refuses_unsafe_adapter_names(api_server, tenant_a, peft_adapter_archive):
    with api_server.client(tenant_a.api_key) as c:
        for name in ["../evil", "a/b", "..", ".hidden", "x" * 200, "a b", "x/../../y"]:
            r = import_adapter(c, name, peft_adapter_archive)
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"] == "name", name
        assert c.get("/v1/adapters").json()["data"] == []


def test_import_refuses_archives_that_escape_or_are_not_adapters(api_server, tenant_a, tmp_path):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        data = b"{}"
        info = tarfile.TarInfo("../../escape.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("not an adapter")
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w:gz") as tar:
        tar.add(tmp_path / "empty", arcname="empty")
    with api_server.client(tenant_a.api_key) as c:
        r = import_adapter(c, "evil", evil.getvalue())
        assert r.status_code == 400 and "unsafe path" in r.json()["error"]["message"]
        r = import_adapter(c, "empty", empty.getvalue())
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
        r = import_adapter(c, "garbage", b"not a tarball at all")
        assert r.status_code == 400 and "unreadable" in r.json()["error"]["message"]
        r = import_adapter(c, "wrongtype", b"x", filename="adapter.rar")
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert not (tmp_path.parent / "escape.json").exists()


def test_missing_adapters_are_404_and_bad_versions_400(api_server, tenant_a):
    with api_server.client(tenant_a.api_key) as c:
        for path in ["/v1/adapters/nope/versions", "/v1/adapters/nope/versions/v1",
                     "/v1/adapters/nope/versions/v1/download"]:
            r = c.get(path)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = c.get("/v1/adapters/x/versions/vv1")
        assert r.status_code == 400 and r.json()["error"]["param"] == "version"


def _zip_of(directory, *, method: int = zipfile.ZIP_DEFLATED) -> bytearray:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as zf:
        for path in sorted(directory.iterdir()):
            zf.write(path, path.name)
    return bytearray(buffer.getvalue())


def _patch_zip_headers(data: bytearray, local_offset: int, central_offset: int, patch) -> bytearray:
    """Apply `patch(data, field_offset)` to the same field of every local and central directory header."""
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        at = data.find(signature)
        while at != -1:
            patch(data, at + offset)
            at = data.find(signature, at + 4)
    return data


def _encrypted_zip(directory) -> bytes:
    def set_encrypted(data, at):  # general-purpose flag bit 0
        data[at] |= 1

    return bytes(_patch_zip_headers(_zip_of(directory), 6, 8, set_encrypted))


def _unknown_method_zip(directory) -> bytes:
    def set_method_99(data, at):
        data[at:at + 2] = (99).to_bytes(2, "little")

    return bytes(_patch_zip_headers(_zip_of(directory), 8, 10, set_method_99))


def _corrupt_deflate_zip(directory) -> bytes:
    data = _zip_of(directory)
    at = data.find(b"PK\x03\x04")
    name_len = int.from_bytes(data[at + 26:at + 28], "little")
    extra_len = int.from_bytes(data[at + 28:at + 30], "little")
    start = at + 30 + name_len + extra_len  # the first member's compressed data
    data[start:start + 4] = b"\xff\xff\xff\xff"  # an invalid deflate block type
    return bytes(data)


def _truncated_xz_tar(directory) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, path.name)
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("make", "filename", "fragment"),
    [
        (_encrypted_zip, "my-adapter.zip", "encrypted"),
        (_unknown_method_zip, "my-adapter.zip", "unreadable"),
        (_corrupt_deflate_zip, "my-adapter.zip", "unreadable"),
        (_truncated_xz_tar, "my-adapter.tar", "unreadable"),
    ],
)
def test_malformed_archive_is_a_400_naming_the_uploaded_file(api_server, tenant_a, peft_adapter_dir, make,
                                                             filename, fragment):
    with api_server.client(tenant_a.api_key) as c:
        r = import_adapter(c, "broken", make(peft_adapter_dir), filename=filename)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "adapter"
        assert fragment in error["message"]
        assert f"'{filename}'" in error["message"]
        assert "upload-" not in error["message"]  # never the server's spool file name
        assert c.get("/v1/adapters").json()["data"] == []
    spool = Path(api_server.settings.data_dir) / "tmp" / "uploads"
    assert not spool.exists() or list(spool.iterdir()) == []


@pytest.mark.parametrize("version", ["v²", "²", "v①", "v٣", "v" + "9" * 5000])
def test_non_ascii_digit_versions_are_a_400_not_a_crash(api_server, tenant_a, version):
    with api_server.client(tenant_a.api_key) as c:
        for method in ("GET", "DELETE"):
            r = c.request(method, f"/v1/adapters/mine/versions/{version}")
            assert r.status_code == 400, (method, version, r.text)
            assert r.json()["error"]["param"] == "version"
