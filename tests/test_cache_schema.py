import numpy as np
import pyarrow.parquet as pq
import pytest
from cache_fixtures import TINY_INFO

from sdray.data import cache
from sdray.errors import InputError

INFO = TINY_INFO


def _table(n=3):
    rng = np.random.default_rng(0)
    return cache.to_table(
        INFO,
        ids=[f"r{i}" for i in range(n)],
        captions=["c"] * n,
        latents=rng.normal(size=(n, 4, 8, 8)),
        latent_std=rng.random((n, 4, 8, 8)),
        text_embeds=rng.normal(size=(n, 77, 32)),
    )


def test_round_trip_with_plain_pyarrow(tmp_path):
    table = _table()
    pq.write_table(table, tmp_path / "part-0.parquet")
    back = pq.read_table(tmp_path / "part-0.parquet")
    assert back.schema.field(cache.LATENT).type.value_type == "halffloat"
    info = cache.read_shard_info(tmp_path / "part-0.parquet")
    assert info == INFO
    latents = back.column(cache.LATENT).combine_chunks().flatten().to_numpy().reshape(-1, *info.latent_shape)
    expected = np.random.default_rng(0).normal(size=(3, 4, 8, 8)).astype(np.float16)
    np.testing.assert_array_equal(latents, expected)
    batch = cache.unflatten({cache.TEXT_EMBEDS: np.zeros((3, 77 * 32), np.float16)}, info)
    assert batch[cache.TEXT_EMBEDS].shape == (3, 77, 32)


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="latent"):
        cache.to_table(
            INFO,
            ids=["a"],
            captions=["c"],
            latents=np.zeros((1, 4, 4, 4)),
            latent_std=np.zeros((1, 4, 8, 8)),
            text_embeds=np.zeros((1, 77, 32)),
        )


def test_info_file_errors(tmp_path):
    with pytest.raises(InputError, match="not a latent cache"):
        cache.read_cache_info(tmp_path)
    (tmp_path / cache.INFO_FILE).write_text('{"format_version": 99}')
    with pytest.raises(InputError, match="format version 99"):
        cache.read_cache_info(tmp_path)


def test_sidecars_round_trip(tmp_path):
    empty = np.random.default_rng(1).normal(size=(77, 32)).astype(np.float16)
    cache.write_sidecars(tmp_path, INFO, empty)
    assert cache.read_cache_info(tmp_path) == INFO
    np.testing.assert_array_equal(cache.read_empty_caption(tmp_path), empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.INFO_FILE, cache.EMPTY_CAPTION_FILE]
