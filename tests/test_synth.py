import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.data.synth import COLORS, SynthConfig, read_synth_meta, write_synth
from sdray.errors import ConfigError


def test_layout_and_decodable_images(synth_dir):
    table = pq.read_table(synth_dir)
    assert table.num_rows == 64
    assert len(list(synth_dir.glob("part-*.parquet"))) == 2
    assert table.schema.field("image").type.names == ["bytes", "path"]
    for row in table.slice(0, 8).to_pylist():
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.size == (64, 64) and image.mode == "RGB"
        assert row["caption"] == (
            f"a {row['size']} {row['color']} {row['shape']} in the {row['position']} "
            f"on a {row['background']} background"
        )
    assert len(set(table.column("id").to_pylist())) == 64


def test_attributes_are_in_the_pixels(synth_dir):
    """The dominant non-background colour sits in the captioned quadrant and is the captioned colour."""
    for row in pq.read_table(synth_dir).slice(0, 16).to_pylist():
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        pixels = [(x, y, image.getpixel((x, y))) for x in range(64) for y in range(64)]
        fg = [(x, y, p) for x, y, p in pixels if sum(p) > 60]
        mean_x = sum(x for x, _, _ in fg) / len(fg)
        mean_y = sum(y for _, y, _ in fg) / len(fg)
        assert ("left" in row["position"]) == (mean_x < 32)
        assert ("top" in row["position"]) == (mean_y < 32)
        colour = max(set(p for _, _, p in fg), key=[p for _, _, p in fg].count)
        assert colour == COLORS[row["color"]]


def test_deterministic_by_seed(tmp_path):
    cfg = SynthConfig(num_images=20, resolution=32)
    a = pq.read_table(write_synth(cfg, tmp_path / "a"))
    b = pq.read_table(write_synth(cfg, tmp_path / "b"))
    c = pq.read_table(write_synth(SynthConfig(num_images=20, resolution=32, seed=1), tmp_path / "c"))
    assert a.equals(b)
    assert a.column("image").to_pylist() != c.column("image").to_pylist()


def test_held_out_combinations_never_appear(synth_dir):
    meta = read_synth_meta(synth_dir)
    held_out = {tuple(c) for c in meta["held_out"]}
    assert len(held_out) == 8
    rows = pq.read_table(synth_dir, columns=["color", "shape", "position"]).to_pylist()
    assert not {(r["color"], r["shape"], r["position"]) for r in rows} & held_out


def test_jpeg_and_other_attributes(tmp_path):
    cfg = SynthConfig(
        num_images=8,
        resolution=48,
        image_format="jpeg",
        sizes=("small", "large"),
        backgrounds=("white", "gray"),
    )
    row = pq.read_table(write_synth(cfg, tmp_path / "j")).to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "JPEG"
    assert row["background"] in ("white", "gray")


def test_refuses_existing_output(synth_dir):
    with pytest.raises(ConfigError, match="already exists"):
        write_synth(SynthConfig(num_images=1), synth_dir)


def test_bad_attribute():
    with pytest.raises(ConfigError, match="colors"):
        SynthConfig(colors=("pink",))
