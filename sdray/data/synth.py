"""Synthetic captioned scenes: one coloured shape on a background, the caption describes it fully.

Rows follow the layout of public image-caption sets (`image` = {bytes, path} struct, `caption` string, `id`)
plus one column per attribute, so a generated image can later be scored against its caption. A few
(colour, shape, position) combinations are held out of the data set entirely, for measuring
compositional generalisation; they are listed in `_synth.json` beside the shards.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from sdray.config import to_dict
from sdray.errors import ConfigError
from sdray.storage import atomic_dir

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "magenta": (220, 30, 220),
    "cyan": (20, 220, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {  # centre of each quadrant, as a fraction of the side
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.2}  # half-extent of the shape, fraction of the side
ATTRIBUTES = ("color", "shape", "position", "size", "background")


@dataclass(kw_only=True, frozen=True)
class SynthConfig:
    num_images: int = 1024
    """Rows to write (all from combinations not held out)."""
    resolution: int = 64
    """Side of the square images, pixels."""
    seed: int = 0
    """Everything (attributes, jitter, held-out set) is a function of this seed."""
    rows_per_shard: int = 1024
    """Rows per parquet file."""
    image_format: str = "png"
    """`png` (lossless) or `jpeg`."""
    colors: tuple[str, ...] = tuple(COLORS)
    """Subset of: red green blue yellow magenta cyan."""
    shapes: tuple[str, ...] = SHAPES
    """Subset of: circle square triangle."""
    positions: tuple[str, ...] = tuple(POSITIONS)
    """Subset of the four quadrants."""
    sizes: tuple[str, ...] = ("large",)
    """Subset of: small large."""
    backgrounds: tuple[str, ...] = ("black",)
    """Subset of: black white gray."""
    held_out: int = 8
    """(colour, shape, position) combinations never written, kept for compositional evaluation."""
    jitter: float = 0.05
    """Random shift of the centre, fraction of the side (keeps the shape inside its quadrant)."""

    def __post_init__(self) -> None:
        for name, chosen, known in [
            ("colors", self.colors, COLORS),
            ("shapes", self.shapes, SHAPES),
            ("positions", self.positions, POSITIONS),
            ("sizes", self.sizes, SIZES),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ]:
            bad = [c for c in chosen if c not in known]
            if bad or not chosen:
                raise ConfigError(f"{name}: unknown or empty {bad or chosen}; choose from {list(known)}")
        if self.image_format not in ("png", "jpeg"):
            raise ConfigError(f"image_format must be png or jpeg, got {self.image_format!r}")
        if self.num_images < 1 or self.rows_per_shard < 1:
            raise ConfigError("num_images and rows_per_shard must be >= 1")
        if self.resolution < 16:
            raise ConfigError(f"resolution must be >= 16, got {self.resolution}")
        if not 0 <= self.held_out < len(self.combinations()):
            raise ConfigError(f"held_out must be in [0, {len(self.combinations())}), got {self.held_out}")

    def combinations(self) -> list[tuple[str, str, str]]:
        """All (colour, shape, position) triples, in a fixed order."""
        return list(itertools.product(self.colors, self.shapes, self.positions))

    def held_out_combinations(self) -> list[tuple[str, str, str]]:
        """The triples excluded from the data set (deterministic by seed)."""
        return sorted(random.Random(f"held-out:{self.seed}").sample(self.combinations(), self.held_out))


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    position: str
    size: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} in the {self.position} on a {self.background} background"

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def render(scene: Scene, resolution: int, rng: random.Random, *, jitter: float = 0.05) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``resolution``; ``rng`` drives the centre jitter."""
    image = Image.new("RGB", (resolution, resolution), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-jitter, jitter)) * resolution
    cy = (fy + rng.uniform(-jitter, jitter)) * resolution
    r = SIZES[scene.size] * resolution
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        side = r * math.sqrt(math.pi) / 2  # same area as the circle, so size does not give the shape away
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    else:
        h = r * 1.35
        draw.polygon([(cx, cy - h), (cx - h * 0.95, cy + h * 0.7), (cx + h * 0.95, cy + h * 0.7)], fill=fill)
    return image


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def iter_scenes(cfg: SynthConfig) -> Iterator[tuple[int, Scene, random.Random]]:
    """Yield (index, scene, per-row rng); the same config always yields the same rows."""
    held_out = set(cfg.held_out_combinations())
    allowed = [c for c in cfg.combinations() if c not in held_out]
    for index in range(cfg.num_images):
        rng = random.Random(f"{cfg.seed}:{index}")
        color, shape, position = rng.choice(allowed)
        yield index, Scene(color, shape, position, rng.choice(cfg.sizes), rng.choice(cfg.backgrounds)), rng


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("caption", pa.string()),
        *[(name, pa.string()) for name in ATTRIBUTES],
    ]
)


def _shard_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_synth(cfg: SynthConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the data set as ``part-NNNNN.parquet`` shards plus ``_synth.json``; atomic as a whole."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output {out_dir} already exists (pass --overwrite to replace it)")
    ext = "png" if cfg.image_format == "png" else "jpg"
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        rows: list[dict] = []
        shard = 0
        for index, scene, rng in tqdm(iter_scenes(cfg), total=cfg.num_images, desc="synth", unit="img"):
            row_id = f"synth-{cfg.seed}-{index:08d}"
            data = encode_image(render(scene, cfg.resolution, rng, jitter=cfg.jitter), cfg.image_format)
            rows.append(
                {
                    "id": row_id,
                    "image": {"bytes": data, "path": f"{row_id}.{ext}"},
                    "caption": scene.caption,
                    **scene.attributes(),
                }
            )
            if len(rows) == cfg.rows_per_shard or index == cfg.num_images - 1:
                pq.write_table(_shard_table(rows), tmp / f"part-{shard:05d}.parquet")
                rows, shard = [], shard + 1
        meta = {
            "config": to_dict(cfg),
            "held_out": [list(c) for c in cfg.held_out_combinations()],
            "attributes": list(ATTRIBUTES),
            "num_rows": cfg.num_images,
        }
        (tmp / "_synth.json").write_text(json.dumps(meta, indent=2))
    log.info("wrote %d images in %d shards to %s", cfg.num_images, shard, out_dir)
    return out_dir


def read_synth_meta(data_dir: str | Path) -> dict:
    """The ``_synth.json`` written beside the shards (config, held-out combinations)."""
    path = Path(data_dir) / "_synth.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {data_dir} a data set written by `sdray data synth`?")
    return json.loads(path.read_text())
