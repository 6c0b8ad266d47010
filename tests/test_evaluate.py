"""Caption-faithfulness metric: right on real synth images, at chance on noise, files and errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdray.data.synth import Scene, SynthConfig, iter_scenes, render
from sdray.errors import InputError
from sdray.evaluate import faithfulness, parse_caption, recover
from sdray.evaluate.faithfulness import CHANCE, derangement, evaluation_prompts
from sdray.evaluate.report import EvaluateOptions, evaluate_dir, read_manifest, write_samples

ATTRS = ("color", "shape", "position")


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Image.Image, dict]]:
    """720 rendered scenes, every (colour, shape, position) combination 10 times on average."""
    cfg = SynthConfig(num_images=720, held_out=0, seed=3)
    return [(render(s, 64, rng, jitter=cfg.jitter), s.attributes()) for _, s, rng in iter_scenes(cfg)]


def test_real_synth_images_are_read_correctly(scenes):
    metrics = faithfulness([im for im, _ in scenes], [t for _, t in scenes])
    acc = metrics["generated"]["all"]
    assert acc["n"] == 720
    for name in ATTRS:
        assert acc[name] >= 0.99, (name, acc)
    # Every image is read right, so the caption-shuffled baseline is what chance gives on these captions.
    for name in ATTRS:
        assert metrics["baseline"]["all"][name] < CHANCE[name] + 0.1


@pytest.mark.parametrize("background", ["white", "gray"])
def test_other_backgrounds(background):
    rng = np.random.default_rng(0)
    hits = []
    for i in range(60):
        scene = Scene(
            color=["red", "green", "blue", "yellow", "magenta", "cyan"][i % 6],
            shape=["circle", "square", "triangle"][i % 3],
            position=["top left", "top right", "bottom left", "bottom right"][int(rng.integers(4))],
            size="large",
            background=background,
        )
        got = recover(render(scene, 64, random.Random(i))).as_dict()
        hits.append(all(got[a] == getattr(scene, a) for a in ATTRS))
    assert np.mean(hits) >= 0.97


def test_noise_images_score_near_chance(scenes):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes]
    acc = faithfulness(noise, [t for _, t in scenes])["generated"]["all"]
    for name in ATTRS:
        assert abs(acc[name] - CHANCE[name]) < 0.1, (name, acc[name])
    assert acc["all"] < 0.1


def test_blank_image_has_no_attributes():
    got = recover(np.zeros((64, 64, 3), np.uint8))
    assert got.as_dict() == {"color": None, "shape": None, "position": None}


def test_held_out_reported_separately(scenes):
    images, targets = [im for im, _ in scenes[:40]], [t for _, t in scenes[:40]]
    held = (targets[0]["color"], targets[0]["shape"], targets[0]["position"])
    held_rows = {i for i, t in enumerate(targets) if (t["color"], t["shape"], t["position"]) == held}
    # "Generated" images: the real ones, except that the held-out prompts get a blank image.
    generated = [np.zeros((64, 64, 3), np.uint8) if i in held_rows else im for i, im in enumerate(images)]
    metrics = faithfulness(generated, targets, held_out=[held], real=(images, targets))
    expected = {"n": len(held_rows), "color": 0.0, "shape": 0.0, "position": 0.0, "all": 0.0}
    assert metrics["generated"]["held_out"] == expected
    assert metrics["generated"]["seen"]["n"] == 40 - len(held_rows)
    assert metrics["generated"]["seen"]["all"] == 1.0
    assert metrics["real"]["held_out"]["all"] == 1.0


def test_parse_caption():
    assert parse_caption("a large red circle in the top left on a black background") == {
        "color": "red",
        "shape": "circle",
        "position": "top left",
    }
    with pytest.raises(InputError, match="exactly one color"):
        parse_caption("a circle in the top left")


def test_evaluation_prompts_cover_every_combination_held_out_first():
    cfg = SynthConfig(num_images=10)
    prompts = evaluation_prompts(cfg, per_combination=2)
    assert len(prompts) == 2 * 72
    held = [tuple(t.values()) for _, t in prompts[:16:2]]
    assert held == cfg.held_out_combinations()
    assert all(parse_caption(p) == t for p, t in prompts)


def test_derangement_moves_every_item():
    items = list(range(20))
    shuffled = derangement(items, seed=1)
    assert sorted(shuffled) == items and all(a != b for a, b in zip(items, shuffled, strict=True))


def _write_generated(directory: Path, scenes, n: int) -> None:
    write_samples(directory, [im for im, _ in scenes[:n]], [Scene(**a).caption for _, a in scenes[:n]])


def test_evaluate_dir_writes_metrics_and_grid(tmp_path, scenes, synth_dir):
    _write_generated(tmp_path / "gen", scenes, 24)
    metrics = evaluate_dir(EvaluateOptions(generated=str(tmp_path / "gen"), output=str(tmp_path / "out"),
                                           data=str(synth_dir), num_real=40))  # fmt: skip
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["generated"]["all"]["color"] == metrics["generated"]["all"]["color"] == 1.0
    assert on_disk["real"]["all"]["n"] == 40 and on_disk["real"]["all"]["all"] == 1.0
    assert len(on_disk["held_out_combinations"]) == 8
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == (8 * (128 + 6) + 6, 3 * (128 + 44) + 6)


def test_manifest_errors_name_the_line(tmp_path, scenes):
    _write_generated(tmp_path / "gen", scenes, 2)
    manifest = tmp_path / "gen" / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"file": "missing.png", "prompt": "a red circle"}\n')
    with pytest.raises(InputError, match=r"manifest.jsonl:3: image .*missing.png not found"):
        read_manifest(tmp_path / "gen")


def test_cli_bad_input_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "evaluate",
            "--generated",
            str(tmp_path),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "manifest.jsonl not found" in result.stderr
