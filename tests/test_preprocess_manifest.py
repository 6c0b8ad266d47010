"""The writer's side of the output directory, without Ray: atomic puts, leftovers, refusal, totals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cache_fixtures import TINY_INFO

from sdray.data import cache
from sdray.data.cache import UnitRecord
from sdray.errors import ConfigError, InputError
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.dataset import check_cpus
from sdray.preprocess.manifest import OutputDir, totals

INFO = dataclasses.replace(TINY_INFO, has_std=False)


def test_prepare_writes_sidecars_then_refuses_another_model(tmp_path):
    out = OutputDir(str(tmp_path / "c"))
    assert out.prepare(INFO, np.zeros((77, 32))) is False
    assert cache.read_cache_info(tmp_path / "c") == INFO
    assert cache.read_empty_caption(tmp_path / "c").shape == (77, 32)
    assert out.prepare(INFO, np.zeros((77, 32))) is True
    other = cache.CacheInfo(**{**INFO.__dict__, "encoder_fingerprint": "cd" * 32, "model_source": "x"})
    with pytest.raises(ConfigError, match=r"encoder_fingerprint: cache has 'abab.*delete this one"):
        out.prepare(other, np.zeros((77, 32)))
    with pytest.raises(InputError, match="no output"):
        OutputDir("")


def test_commit_clean_and_totals(tmp_path):
    out = OutputDir(str(tmp_path))
    for name in [
        "part-aaaa-1.parquet",
        "part-aaaa-2.parquet",  # an orphan: its unit is finished but its record does not list it
        "part-bbbb-1.parquet",
        "part-bbbb-2.parquet",
        ".part-x.parquet.tmp-1234",
    ]:
        (tmp_path / name).write_bytes(b"x")
    out.write_bytes("_rejects/bbbb.jsonl", b"{}\n")
    done = UnitRecord(
        input="a.parquet", size=10, rows=3, written=2, rejected={"corrupt": 1}, shards=["part-aaaa-1.parquet"]
    )
    out.commit("aaaa", done, [{"id": "r3", "reason": "corrupt", "detail": "", "input": "a.parquet"}])
    assert out.done() == {"aaaa": done}
    assert out.read_rejects() == [{"id": "r3", "reason": "corrupt", "detail": "", "input": "a.parquet"}, {}]
    # two shards, the reject log and the temp file of unfinished work, and the finished unit's orphan shard
    assert out.clean({"bbbb"}, out.done()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_manifest", "_rejects", "part-aaaa-1.parquet"]
    assert not list(tmp_path.glob(".*"))
    summary = totals(out.done())
    assert (summary["rows_in"], summary["rows_written"], summary["rows_rejected"]) == (3, 2, 1)
    assert summary["rejected_by_reason"] == {"corrupt": 1}


def test_encoder_actors_may_not_take_every_cpu():
    check_cpus(PreprocessConfig(encode_num_cpus=1), 2)
    with pytest.raises(ConfigError, match=r"cluster has 2 CPUs but encoder actors take 2 .*stalls"):
        check_cpus(PreprocessConfig(encode_num_cpus=2), 2)
