"""`sdray evaluate` on files: read generated PNGs + their manifest, real synth rows, write metrics.json + grid.

A generated-image directory holds PNG files and `manifest.jsonl`, one JSON object per line:
    {"file": "000.png", "prompt": "a large red circle in the top left on a black background"}
Optional `color`/`shape`/`position` keys override what is parsed from the prompt. Any code that can save PNGs
can be evaluated (the serving stage, diffusers, another tool): nothing here imports a model.
"""

from __future__ import annotations

import io
import json
import logging
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from sdray.data.synth import read_synth_meta
from sdray.errors import InputError
from sdray.evaluate.attributes import EVALUATED
from sdray.evaluate.faithfulness import Attrs, faithfulness, parse_caption
from sdray.storage import atomic_dir, write_bytes, write_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"


@dataclass(kw_only=True, frozen=True)
class EvaluateOptions:
    """Inputs and outputs of one evaluation."""

    generated: str
    """Directory of generated PNGs with `manifest.jsonl`."""
    output: str
    """Directory for metrics.json and grid.png."""
    data: str = ""
    """Synth data set (`sdray data synth`): real images (upper bound) and the held-out combinations."""
    num_real: int = 256
    """Real images to score (the first rows of the data set)."""
    baseline: str = ""
    """Directory of baseline images with its own manifest; empty: caption-shuffled generated images."""
    grid_images: int = 32
    """Generated images shown in grid.png."""
    seed: int = 0
    """Seed of the caption shuffle."""


def _targets(entry: dict, where: str) -> Attrs:
    try:
        attrs = parse_caption(entry["prompt"]) if "prompt" in entry else {}
    except InputError as exc:
        if not all(name in entry for name in EVALUATED):
            raise InputError(f"{where}: {exc}") from None
        attrs = {}
    attrs.update({name: entry[name] for name in EVALUATED if name in entry})
    missing = [name for name in EVALUATED if name not in attrs]
    if missing:
        raise InputError(f"{where}: no prompt or {missing} given")
    return attrs


def read_manifest(directory: str | Path) -> tuple[list[Image.Image], list[str], list[Attrs]]:
    """Images, prompts and target attributes listed in ``directory/manifest.jsonl``."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{manifest} not found: a generated-image directory needs a {MANIFEST}")
    images, prompts, targets = [], [], []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            entry = json.loads(line)
            file = directory / entry["file"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where}: expected a JSON object with a 'file' key: {exc}") from None
        if not file.is_file():
            raise InputError(f"{where}: image {file} not found")
        images.append(Image.open(file).convert("RGB"))
        prompts.append(entry.get("prompt", ""))
        targets.append(_targets(entry, where))
    if not images:
        raise InputError(f"{manifest}: no entries")
    return images, prompts, targets


def read_real(data_dir: str | Path, limit: int) -> tuple[list[Image.Image], list[str], list[Attrs]]:
    """The first ``limit`` rows of a synth data set: images, captions and true attributes."""
    shards = sorted(Path(data_dir).glob("*.parquet"))
    if not shards:
        raise InputError(f"{data_dir}: no parquet shards")
    images, captions, targets = [], [], []
    for shard in shards:
        for row in pq.read_table(shard, columns=["image", "caption", *EVALUATED]).to_pylist():
            if len(images) >= limit:
                return images, captions, targets
            images.append(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
            captions.append(row["caption"])
            targets.append({name: row[name] for name in EVALUATED})
    return images, captions, targets


def sample_grid(
    images: Sequence[Image.Image], prompts: Sequence[str], *, correct: Sequence[bool] | None = None
) -> Image.Image:
    """A grid of images, each upscaled to 128 px with its prompt underneath (green: all attributes
    recovered as asked, red: not), on white with a gap between cells."""
    cell, gap, text_h, columns = 128, 6, 44, min(8, max(1, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + text_h) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = gap + (i % columns) * (cell + gap), gap + (i // columns) * (cell + text_h)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        colour = (0, 0, 0) if correct is None else ((0, 120, 0) if correct[i] else (190, 0, 0))
        short = re.sub(r" on an? (\w+) background$", r" on \1", prompt.removeprefix("a "))
        text = "\n".join(textwrap.wrap(short, 22)[:3])
        draw.multiline_text((x, y + cell + 2), text, fill=colour, font=font, spacing=1)
    return grid


def write_grid(path: str | Path, grid: Image.Image) -> Path:
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
    return Path(path)


def write_samples(out_dir: str | Path, images: Sequence[Image.Image], prompts: Sequence[str]) -> Path:
    """Save images as NNNNN.png with a `manifest.jsonl`, the input `sdray evaluate --generated` reads.
    Written atomically (a temp folder renamed into place; an existing ``out_dir`` is replaced)."""
    with atomic_dir(out_dir, overwrite=True) as tmp:
        lines = []
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            image.save(tmp / f"{i:05d}.png")
            lines.append(json.dumps({"file": f"{i:05d}.png", "prompt": prompt}))
        (tmp / MANIFEST).write_text("\n".join(lines) + "\n")
    return Path(out_dir)


def write_evaluation(
    out_dir: str | Path,
    metrics: dict,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    targets: Sequence[Attrs],
    *,
    grid_images: int = 32,
) -> None:
    """Write ``metrics.json`` (from :func:`faithfulness`) and ``grid.png`` of the first ``grid_images``."""
    out = Path(out_dir)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    shown = min(grid_images, len(images))
    correct = [
        all(r[a] == t[a] for a in EVALUATED) for r, t in zip(metrics["recovered"], targets, strict=True)
    ]
    write_grid(out / "grid.png", sample_grid(images[:shown], prompts[:shown], correct=correct[:shown]))


def evaluate_dir(opts: EvaluateOptions) -> dict:
    """Score ``opts.generated`` and write ``metrics.json`` and ``grid.png`` to ``opts.output``."""
    images, prompts, targets = read_manifest(opts.generated)
    held_out, real = [], None
    if opts.data:
        held_out = read_synth_meta(opts.data)["held_out"]
        real_images, _, real_targets = read_real(opts.data, opts.num_real)
        real = (real_images, real_targets)
    baseline = None
    if opts.baseline:
        base_images, _, base_targets = read_manifest(opts.baseline)
        baseline = (base_images, base_targets)
    metrics = faithfulness(images, targets, held_out=held_out, real=real, baseline=baseline, seed=opts.seed)
    write_evaluation(opts.output, metrics, images, prompts, targets, grid_images=opts.grid_images)
    log.info("evaluated %d images; wrote %s/metrics.json and grid.png", len(images), opts.output)
    return metrics
