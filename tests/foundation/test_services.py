"""The real test services behave like the real thing: Redis survives SIGKILL, S3 speaks HTTP."""

from __future__ import annotations


def test_redis_write_survives_sigkill_with_aof_always(redis_server):
    client = redis_server.client()
    client.set("lf:test:durable", b"written before the crash")
    client.close()

    redis_server.kill()
    redis_server.start()  # same port, same dir: the AOF is replayed

    client = redis_server.client()
    assert client.get("lf:test:durable") == b"written before the crash"
    assert client.config_get("appendfsync")["appendfsync"] == "always"
    client.close()


def test_s3_object_round_trips_through_boto3_over_http(s3_endpoint):
    s3 = s3_endpoint.client()
    body = bytes(range(256)) * 10
    s3.put_object(Bucket=s3_endpoint.bucket, Key="tenants/t1/objects/blob.bin", Body=body)

    got = s3.get_object(Bucket=s3_endpoint.bucket, Key="tenants/t1/objects/blob.bin")
    assert got["Body"].read() == body
    assert s3_endpoint.endpoint_url.startswith("http://127.0.0.1:")
    listed = s3.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix="tenants/t1/")
    assert [o["Key"] for o in listed["Contents"]] == ["tenants/t1/objects/blob.bin"]
