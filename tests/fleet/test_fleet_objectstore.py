"""Both ObjectStore backends (local filesystem, S3 via a moto server) through the same tests."""

from __future__ import annotations

import io

import pytest

from fleet.checkpoints import checkpoint_prefix, delete_job_checkpoints, download_checkpoint, upload_checkpoint
from fleet.exceptions import InvalidRequest, NotFound, PayloadTooLarge
from fleet.fencing import Fence
from fleet.files import FileStore, file_object_key
from fleet.objectstore import LocalObjectStore


def test_put_get_list_size_delete(object_store, tmp_path):
    object_store.put_bytes("a/b/one.txt", b"one")
    src = tmp_path / "two.bin"
    src.write_bytes(b"\x00" * 3000)
    object_store.put_file("a/b/two.bin", src)
    object_store.put_stream("a/c/three", io.BytesIO(b"three"))
    assert object_store.get_bytes("a/b/one.txt") == b"one"
    assert object_store.size("a/b/two.bin") == 3000
    assert object_store.list("a/b/") == ["a/b/one.txt", "a/b/two.bin"]
    assert object_store.list("a/") == ["a/b/one.txt", "a/b/two.bin", "a/c/three"]
    with object_store.open("a/c/three") as f:
        assert f.read() == b"three"
    assert b"".join(object_store.iter_chunks("a/b/two.bin", 1000)) == b"\x00" * 3000
    out = tmp_path / "dl" / "two.bin"
    object_store.download_file("a/b/two.bin", out)
    assert out.read_bytes() == b"\x00" * 3000
    object_store.put_bytes("a/b/one.txt", b"replaced")
    assert object_store.get_bytes("a/b/one.txt") == b"replaced"
    object_store.delete("a/b/one.txt")
    object_store.delete("a/b/one.txt")  # deleting a missing object is fine
    assert not object_store.exists("a/b/one.txt") and object_store.exists("a/c/three")


def test_missing_objects_raise_not_found(object_store, tmp_path):
    for call in (
        lambda: object_store.get_bytes("nope"),
        lambda: object_store.size("nope"),
        lambda: object_store.open("nope"),
        lambda: object_store.download_file("nope", tmp_path / "x"),
    ):
        with pytest.raises(NotFound):
            call()
    assert object_store.list("nothing/") == []


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_unsafe_keys_are_rejected(key, tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(InvalidRequest):
        store.put_bytes(key, b"x")
    assert not (tmp_path / "escape").exists()


def test_local_writes_leave_no_partial_file_when_the_source_fails(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")

    class Broken(io.RawIOBase):
        def readinto(self, b):
            raise OSError("disk gone")

    with pytest.raises(OSError):
        store.put_stream("x/y", Broken())
    assert list((tmp_path / "objects").rglob("*.part")) == [] and not store.exists("x/y")


def test_files_store_metadata_and_bytes_per_tenant(object_store, r):
    files = FileStore(r, object_store, max_upload_bytes=1000)
    data = b'{"messages": []}\n' * 10
    record = files.create_file(
        "t1", filename="C:\\Users\\me\\train.jsonl", purpose="fine-tune", content=io.BytesIO(data)
    )
    assert record.id.startswith("file-") and record.filename == "train.jsonl" and record.bytes == len(data)
    assert object_store.exists(file_object_key("t1", record.id))
    assert files.content("t1", record.id) == data
    assert b"".join(files.iter_content("t1", record.id)) == data
    with pytest.raises(NotFound):
        files.get_file("t2", record.id)
    with pytest.raises(NotFound):
        files.content("t2", record.id)
    assert files.list_files("t2") == ([], False)
    second = files.create_file("t1", filename="b.jsonl", purpose="fine-tune", content=b"x")
    assert [f.id for f in files.list_files("t1")[0]] == [second.id, record.id]
    assert files.set_status("t1", record.id, "processed", "10 examples").status == "processed"
    files.delete_file("t1", record.id)
    with pytest.raises(NotFound):
        files.get_file("t1", record.id)
    assert not object_store.exists(file_object_key("t1", record.id))


def test_oversize_upload_is_rejected_and_leaves_nothing(object_store, r):
    files = FileStore(r, object_store, max_upload_bytes=100)
    with pytest.raises(PayloadTooLarge):
        files.create_file("t1", filename="big.jsonl", purpose="fine-tune", content=io.BytesIO(b"x" * 5000))
    with pytest.raises(InvalidRequest):
        files.create_file("t1", filename="a.jsonl", purpose="assistants", content=b"x")
    assert files.list_files("t1") == ([], False)
    assert object_store.list("tenants/") == []


def test_checkpoints_round_trip_through_the_store(object_store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "optimizer").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    (src / "optimizer" / "state.pt").write_bytes(b"adam")
    fence = Fence("ftjob-abc", 1, "0123456789abcdef")
    location = upload_checkpoint(object_store, "t1", "ftjob-abc", 40, src, fence=fence)
    assert location == checkpoint_prefix("t1", "ftjob-abc", 40, fence=fence)
    assert location == "tenants/t1/jobs/ftjob-abc/checkpoints/a1-0123456789ab/step-00000040/"
    dest = download_checkpoint(object_store, location, tmp_path / "resume")
    assert (dest / "optimizer" / "state.pt").read_bytes() == b"adam"
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights"
    assert delete_job_checkpoints(object_store, "t1", "ftjob-abc") == 2
    with pytest.raises(NotFound):
        download_checkpoint(object_store, location, tmp_path / "again")
