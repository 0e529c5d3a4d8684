"""Ray Train's persistent storage is one every node reaches: the S3 bucket, or a shared path."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.settings import Settings
from workers.ray_storage import ray_storage_for


def test_ray_storage_defaults_to_the_bucket_with_s3_and_to_the_local_stores_root_otherwise(tmp_path, s3_endpoint):
    local = ray_storage_for(Settings(data_dir=tmp_path / "var"))
    assert local.filesystem is None and Path(local.path) == (tmp_path / "var" / "objects" / "ray").resolve()
    shared = ray_storage_for(Settings(data_dir=tmp_path / "var", ray_storage_path=str(tmp_path / "nfs")))
    assert shared.filesystem is None and shared.path == str(tmp_path / "nfs")

    s3 = Settings(object_store="s3", s3_endpoint_url=s3_endpoint.endpoint_url, s3_bucket=s3_endpoint.bucket,
                  s3_prefix="rs/", s3_access_key_id="test", s3_secret_access_key="test")
    storage = ray_storage_for(s3)
    assert storage.path == f"{s3_endpoint.bucket}/rs/ray"
    with storage.filesystem.open_output_stream(f"{storage.run_path('run-1')}/step-00000001/state.pt") as out:
        out.write(b"state")
    listed = s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="rs/ray/run-1/")
    assert [o["Key"] for o in listed["Contents"]] == ["rs/ray/run-1/step-00000001/state.pt"]
    storage.remove_run("run-1")
    storage.remove_run("run-never-ran")  # nothing to remove is fine
    assert "Contents" not in s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="rs/ray/run-1/")
    explicit = ray_storage_for(s3.model_copy(update={"ray_storage_path": f"s3://{s3_endpoint.bucket}/elsewhere/"}))
    assert explicit.path == f"{s3_endpoint.bucket}/elsewhere" and explicit.filesystem is not None


def test_rays_storage_in_an_unreachable_bucket_is_an_infrastructure_fault(tmp_path):
    import socket

    from workers.errors import is_infrastructure_fault

    with socket.socket() as probe:  # a port nothing listens on: every request is refused
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    storage = ray_storage_for(Settings(object_store="s3", s3_bucket="lorafleet", s3_access_key_id="k",
                                       s3_secret_access_key="s", s3_endpoint_url=f"http://127.0.0.1:{closed_port}"))
    # What Ray Train raises in a worker that persists a checkpoint there, and hands the driver without
    # a traceback (a bare OSError naming the AWS error), wrapped as the dispatcher gets it.
    with pytest.raises(OSError) as raised:
        storage.filesystem.get_file_info(storage.run_path("run-1") + "/step-00000002")
    outer = RuntimeError("training job 'j' failed on Ray")
    outer.__cause__ = raised.value.with_traceback(None)
    assert is_infrastructure_fault(outer), raised.value
    assert not is_infrastructure_fault(OSError("AWS Error ACCESS_DENIED during HeadObject operation: denied"))
