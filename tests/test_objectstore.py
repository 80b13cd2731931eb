"""The object store: the same calls on S3 (the local moto server) and on a local folder; ranged
reads that fetch only what is asked; the connection id carried in the URI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukemia.objectstore import (
    LocalStore,
    S3Store,
    join,
    open_store,
    read_all,
    read_location,
    with_conn,
    write_location,
)


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    if request.param == "local":
        return open_store(tmp_path / "work")  # type: ignore[return-value]
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/work/")  # type: ignore[return-value]


def test_write_read_list_and_exists_behave_alike_on_s3_and_on_disk(store: LocalStore) -> None:
    uri = store.write_bytes("splits/a.csv", b"path,label\n")
    store.child("features").write_bytes("k/part-1.npz", b"x" * 10)
    assert store.read_bytes("splits/a.csv") == b"path,label\n"
    assert read_location(uri) == b"path,label\n"
    assert store.exists("splits/a.csv") and not store.exists("splits/b.csv")
    assert store.list() == {"splits/a.csv": 11, "features/k/part-1.npz": 10}
    assert store.list("features") == {"k/part-1.npz": 10}
    assert store.list("nothing/here") == {}
    with pytest.raises(FileNotFoundError, match="b.csv"):
        store.read_bytes("splits/b.csv")


def test_ranged_reads_fetch_only_the_bytes_asked_for(store: LocalStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    store.write_bytes("big.bin", data)
    store.bytes_read = 0
    with store.open("big.bin") as fh:
        fh.seek(500_000)
        assert fh.read(10) == data[500_000:500_010]
        fh.seek(-3, 2)
        assert fh.read() == data[-3:]
    assert store.bytes_read < 200_000  # the buffer's worth around each read, not the 1 MiB


def test_shard_arrays_are_read_without_the_rest_of_the_file(store: LocalStore) -> None:
    from leukemia.features import CACHE_WIDTH, SHA_KEY, cache_index, read_arrays, write_part

    shas = [f"{i:064x}" for i in range(300)]
    rows = np.random.default_rng(0).random((300, CACHE_WIDTH), dtype=np.float32)
    name = write_part(store, shas, rows)
    size = store.list()[name]
    store.bytes_read = 0
    arrays = read_arrays(store, name, ["block5_pool_gmp"])
    np.testing.assert_array_equal(arrays["block5_pool_gmp"], rows[:, -512:])
    assert store.bytes_read < 0.3 * size  # 512 of 2,560 columns
    store.bytes_read = 0
    index = cache_index(store)
    assert index[shas[7]] == (name, 7) and len(index) == 300
    assert store.bytes_read < 0.05 * size  # the sha256 array only
    assert SHA_KEY in read_arrays(store, name, [SHA_KEY])


def test_locations_join_and_parse_as_uris_or_paths(tmp_path: Path) -> None:
    assert join("s3://b/work/", "splits", "a.csv") == "s3://b/work/splits/a.csv"
    assert join("s3://b/work", "features/") == "s3://b/work/features/"
    assert join(tmp_path, "a", "b.csv") == str(tmp_path / "a" / "b.csv")
    assert join(f"file://{tmp_path}", "x") == f"file://{tmp_path}/x"
    s3 = open_store("s3://other_conn@bucket/some/prefix")
    assert isinstance(s3, S3Store) and s3.conn_id == "other_conn"
    assert s3.bucket == "bucket" and s3.prefix == "some/prefix/"
    assert s3.uri("a.csv") == "s3://other_conn@bucket/some/prefix/a.csv"
    assert open_store("s3://bucket/").uri("k") == "s3://bucket/k"  # the default connection
    assert with_conn("s3://bucket/k", "aws_default") == "s3://bucket/k"
    assert with_conn("s3://bucket/k", "mine") == "s3://mine@bucket/k"
    local = open_store(f"file://{tmp_path}/w")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "w"
    with pytest.raises(ValueError, match="unsupported location"):
        open_store("gs://bucket/x")


def test_read_all_mixes_s3_objects_and_local_files_in_order(bucket: str, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"local")
    remote = [write_location(f"s3://{bucket}/raw/{i}.bin", bytes([i])) for i in range(20)]
    found = read_all([remote[3], tmp_path / "a.bin", *remote])
    assert found[:2] == [b"\x03", b"local"] and found[2:] == [bytes([i]) for i in range(20)]


def test_an_unreachable_bucket_says_what_to_check(aws_env: object) -> None:
    store = open_store("s3://no-such-bucket-here/work/")
    with pytest.raises(RuntimeError, match="Check that the bucket exists"):
        store.write_bytes("a", b"x")


def test_inside_compares_bucket_and_key_prefix_whatever_the_connection() -> None:
    from leukemia.objectstore import inside

    assert inside("s3://b/raw/work/", "s3://b/raw/")
    assert inside("s3://conn@b/work/", "s3://b/")  # a bucket-wide prefix holds everything
    assert not inside("s3://b/work/", "s3://b/raw/")
    assert not inside("s3://b/rawer/", "s3://b/raw/")
    assert not inside("s3://c/raw/", "s3://b/raw/")
    assert not inside("/tmp/work", "s3://b/")


def test_s3_client_is_reused_for_the_same_connection_and_rebuilt_when_it_changes(
    aws_env: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukemia.dev.embedded import aws_connection_json
    from leukemia.objectstore import s3_client

    first = s3_client("aws_default")
    assert s3_client("aws_default") is first  # no second botocore model load
    assert s3_client("aws_default", workers=32) is not first  # another pool size
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", aws_connection_json("http://127.0.0.1:9"))
    moved = s3_client("aws_default")
    assert moved is not first and moved.meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_SESSION_TOKEN", "another-token")  # the environment boto3 falls back to
    assert s3_client("aws_default") is not moved
