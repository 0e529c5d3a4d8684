"""Listing a tenant's files: cursor pagination that reads only the page, whatever the number of files."""

from __future__ import annotations

import pytest

from fleet import keys
from fleet.files import FileStore
from fleet.objectstore import LocalObjectStore


@pytest.fixture
def files(r, tmp_path) -> FileStore:
    return FileStore(r, LocalObjectStore(tmp_path / "objects"), max_upload_bytes=1024)


def _create(files: FileStore, tenant_id: str, n: int) -> list[str]:
    return [files.create_file(tenant_id, filename=f"f{i}.jsonl", purpose="fine-tune", content=b"{}\n").id
            for i in range(n)]


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_paging_with_after_visits_every_file_once_in_order(files, order):
    created = _create(files, "t1", 11)  # several share a millisecond: ties in the sorted set
    _create(files, "t2", 3)
    seen, after, has_more = [], None, True
    while has_more:
        page, has_more = files.list_files("t1", after=after, limit=3, order=order)
        assert page or not has_more
        seen += [f.id for f in page]
        after = page[-1].id if page else None
    everything, more = files.list_files("t1", limit=100, order=order)
    assert not more and seen == [f.id for f in everything]
    assert sorted(seen) == sorted(created)
    assert [f.created_at for f in everything] == sorted((f.created_at for f in everything), reverse=order == "desc")


def _bytes_redis_sent(r, list_page) -> int:
    before = r.info("stats")["total_net_output_bytes"]
    list_page()
    return r.info("stats")["total_net_output_bytes"] - before


def test_a_page_reads_only_the_page_however_many_files_the_tenant_has(files, r):
    few = _create(files, "few", 6)
    many = _create(files, "many", 300)
    # The same page (2 files after a cursor) for a tenant with 6 files and one with 300.
    sent_few = _bytes_redis_sent(r, lambda: files.list_files("few", after=few[1], limit=2, order="asc"))
    sent_many = _bytes_redis_sent(r, lambda: files.list_files("many", after=many[-200], limit=2, order="asc"))
    one_record = len(r.get(keys.file(many[0])))
    assert abs(sent_many - sent_few) < one_record, (sent_few, sent_many)  # before: every later record
