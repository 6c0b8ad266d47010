"""Training refuses a latent cache whose preprocessing was interrupted (fast: files only, no Ray)."""

from __future__ import annotations

import json

import pytest

from sdray.data.reader import committed_shards
from sdray.errors import InputError


def _cache(tmp_path, *, summary: bool, listed: list[str], on_disk: list[str], config: bool = True):
    for name in on_disk:
        (tmp_path / name).write_bytes(b"")
    if config:
        (tmp_path / "_config.yaml").write_text("preprocess: {}\n")
    if summary:
        (tmp_path / "_summary.json").write_text("{}")
    (tmp_path / "_manifest").mkdir()
    record = {"input": "in.parquet", "size": 1, "rows": 2, "written": 2, "shards": listed}
    (tmp_path / "_manifest" / "aaaa.json").write_text(json.dumps(record))
    return str(tmp_path), [str(tmp_path / n) for n in on_disk]


def test_finished_cache_is_read(tmp_path):
    path, shards = _cache(tmp_path, summary=True, listed=["part-a-1.parquet"], on_disk=["part-a-1.parquet"])
    assert committed_shards(path, shards) == shards


def test_cache_without_summary_is_refused(tmp_path):
    path, shards = _cache(tmp_path, summary=False, listed=["part-a-1.parquet"], on_disk=["part-a-1.parquet"])
    with pytest.raises(InputError, match=r"preprocessing did not finish \(no _summary.json\)"):
        committed_shards(path, shards)


def test_shard_of_an_unfinished_input_file_is_refused(tmp_path):
    on_disk = ["part-a-1.parquet", "part-b-1.parquet"]  # b was in progress when the rerun was killed
    path, shards = _cache(tmp_path, summary=True, listed=["part-a-1.parquet"], on_disk=on_disk)
    with pytest.raises(InputError, match=r"1 shard\(s\) of unfinished input files, e.g. part-b-1.parquet"):
        committed_shards(path, shards)


def test_cache_from_another_tool_is_read_whole(tmp_path):
    path, shards = _cache(tmp_path, summary=False, listed=[], on_disk=["part-x.parquet"], config=False)
    assert committed_shards(path, shards) == shards
