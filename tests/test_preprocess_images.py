"""Pure functions of stage 1: decoding and checks, colour modes, EXIF, crop, captions, input discovery."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.data import rejects
from sdray.data.images import (
    decode_pixels,
    normalise,
    open_checked,
    pick_caption,
    resize_center_crop,
    to_rgb,
)
from sdray.data.rejects import Rejected
from sdray.errors import ConfigError, InputError
from sdray.preprocess.config import PreprocessConfig
from sdray.preprocess.inputs import resolve_inputs, row_counts


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes, resolution: int = 32, *, min_side: int = 8, max_pixels: int = 10**8) -> np.ndarray:
    return decode_pixels(open_checked(data, min_side=min_side, max_pixels=max_pixels), resolution)


def reason_of(data: bytes | None, **kwargs) -> str:
    with pytest.raises(Rejected) as info:
        decode(data, **kwargs)
    return info.value.reason


def test_every_image_reject_reason():
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    corrupt = bytearray(png)
    corrupt[200:260] = bytes(b ^ 0xFF for b in corrupt[200:260])
    assert reason_of(None) == rejects.MISSING_IMAGE
    assert reason_of(b"") == rejects.EMPTY_IMAGE
    assert reason_of(b"just some text, not an image") == rejects.NOT_AN_IMAGE
    assert reason_of(bytes(corrupt)) == rejects.CORRUPT
    assert reason_of(png[: len(png) // 2]) == rejects.TRUNCATED
    assert reason_of(encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:300]) == rejects.TRUNCATED
    assert reason_of(encode(Image.new("RGB", (7, 100))), min_side=8) == rejects.TOO_SMALL
    # A 20000 x 20000 PNG of one colour is ~1 MB on disk and 1.2 GB decoded: refused from the header alone.
    bomb = encode(Image.new("L", (20000, 20000)), optimize=False)
    assert reason_of(bomb, max_pixels=10**6) == rejects.TOO_LARGE


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (16, 16), 100), (100, 100, 100)),
        (Image.new("RGBA", (16, 16), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white background
        (Image.new("RGBA", (16, 16), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (16, 16), (0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.fromarray(np.full((16, 16), 65535, np.uint16)), (255, 255, 255)),  # 16-bit grey
        (Image.new("I", (16, 16), 32896), (128, 128, 128)),  # 16-bit values in a 32-bit image
        (Image.new("1", (16, 16), 1), (255, 255, 255)),
    ],
)
def test_to_rgb_modes(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((3, 3)) == expected


def test_palette_with_transparency_and_png_round_trip():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    data = encode(palette, transparency=0)
    pixels = decode(data, 16)  # (3, 16, 16)
    assert pixels[:, 0, 0].tolist() == [200, 100, 50]
    assert pixels[:, 0, 15].tolist() == [255, 255, 255]  # palette index 0 is transparent


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    pixels = decode(encode(image, "JPEG", exif=exif, quality=95), 20)
    top, bottom = pixels[:, 2, 10], pixels[:, 17, 10]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_resize_shorter_side_then_center_crop():
    image = Image.new("RGB", (300, 100), "black")
    image.paste((255, 255, 255), (100, 0, 200, 100))  # the middle third is white
    square = resize_center_crop(image, 50)
    assert square.size == (50, 50)
    assert np.asarray(square)[:, 2:-2].min() >= 250  # only the white middle survives the crop
    pixels = decode(encode(Image.new("RGB", (300, 100), "green")), 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8


def test_normalise_range():
    out = normalise(np.array([0, 255], np.uint8).astype(np.float32))
    np.testing.assert_allclose(out, [-1.0, 1.0])


def test_pick_caption():
    assert pick_caption("a cat", "first", "r1") == "a cat"
    assert pick_caption(["", "a dog", "a cat"], "first", "r1") == "a dog"
    picks = {pick_caption(["a", "b", "c", "d"], "random", f"row{i}") for i in range(40)}
    assert picks == {"a", "b", "c", "d"}
    assert pick_caption(["a", "b", "c", "d"], "random", "row7") == pick_caption(
        ["a", "b", "c", "d"], "random", "row7"
    )
    for value, reason in [
        (None, "missing_caption"),
        ("  ", "empty_caption"),
        ([], "missing_caption"),
        ([" ", ""], "empty_caption"),
    ]:
        with pytest.raises(Rejected) as info:
            pick_caption(value, "first", "r")
        assert info.value.reason == reason


def test_config_validation():
    with pytest.raises(ConfigError, match="min_image_side"):
        PreprocessConfig(min_image_side=0)
    with pytest.raises(ConfigError, match="distinct"):
        PreprocessConfig(image_column="x", caption_column="x")


def test_inputs_files_dirs_globs_and_column_errors(tmp_path):
    table = pa.table({"id": ["a"], "image": [b"x"], "caption": ["c"]})
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/p1.parquet", "d/sub/p2.parquet", "d/_skip.parquet", "other.parquet"]:
        pq.write_table(table, tmp_path / name)
    (tmp_path / "d" / "notes.txt").write_text("not parquet")
    _, files = resolve_inputs(str(tmp_path / "d"))
    assert [f.path.removeprefix(str(tmp_path)) for f in files] == ["/d/p1.parquet", "/d/sub/p2.parquet"]
    _, files = resolve_inputs(f"{tmp_path}/*.parquet, {tmp_path}/d/p1.parquet")
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["p1.parquet", "other.parquet"]
    assert len({f.key for f in files}) == 2
    _, files = resolve_inputs(f"{tmp_path}/d/**.parquet")
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["p1.parquet", "p2.parquet"]
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="matches no .parquet"):
        resolve_inputs(f"{tmp_path}/*.csv")
    fs, files = resolve_inputs(str(tmp_path / "other.parquet"))
    assert row_counts(fs, files, PreprocessConfig()) == {files[0].path: 1}
    with pytest.raises(
        InputError, match=r"other.parquet: no caption column 'text'.*preprocess.caption_column"
    ):
        row_counts(fs, files, PreprocessConfig(caption_column="text"))
    pq.write_table(pa.table({"id": ["a"], "image": [1], "caption": ["c"]}), tmp_path / "bad.parquet")
    fs, files = resolve_inputs(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match="image column 'image' has unsupported type int64"):
        row_counts(fs, files, PreprocessConfig())
