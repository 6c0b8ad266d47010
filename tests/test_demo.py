"""`sdray demo --quick` end to end (real Ray Data, Ray Train, diffusers), and how it treats an existing run."""

from __future__ import annotations

import json

import pytest

from pipelines import demo as demo_cli
from sdray.demo import DemoOptions, demo_config, run_demo
from sdray.demo.config import QUICK_IMAGES
from sdray.demo.run import STAGES, prepare_output
from sdray.errors import ConfigError

EVALUATED = ("color", "shape", "position", "all")


def _check_accuracies(block: dict, *, n: int) -> None:
    """Each accuracy counts images out of ``n``, and `all` (every attribute right) is at most any one of them."""
    assert block["n"] == n
    for name in EVALUATED:
        assert block[name] * n == pytest.approx(round(block[name] * n)), (name, block)
    assert block["all"] <= min(block["color"], block["shape"], block["position"]), block


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(ray_session, tmp_path):
    cfg = demo_config("demo", [], quick=True)
    lines: list[str] = []
    report = run_demo(DemoOptions(output=str(tmp_path / "run"), quick=True), cfg, progress=lines.append)

    assert report == tmp_path / "run" / "report"
    for name in ("grid.png", "loss_curves.png", "metrics.json", "report.md"):
        assert (report / name).stat().st_size > 100, name
    # progress: a start and a done line per stage, the done line with its time
    assert len(lines) == 2 * len(STAGES)
    assert all(" done in " in line and line.split(" done in ")[1][0].isdigit() for line in lines[1::2])

    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["quick"] is True
    assert list(metrics["stage_seconds"]) == [name for name, _ in STAGES]
    assert metrics["total_seconds"] == pytest.approx(sum(metrics["stage_seconds"].values()), abs=0.5)
    # every image of the data set was encoded; the stages ran the configured steps
    assert metrics["preprocess"]["rows_written"] == cfg.synth.num_images == metrics["data"]["images"]
    assert metrics["preprocess"]["rows_rejected"] == 0
    assert metrics["vae"]["steps"] == cfg.vae_train.max_steps
    assert metrics["unet"]["steps"] == cfg.train.max_steps
    assert 0 < metrics["vae"]["psnr_db"] < 60

    faith = metrics["faithfulness"]
    held = len(cfg.synth.held_out_combinations())
    combos = QUICK_IMAGES  # quick mode: the held-out combinations first, then seen ones, one image each
    assert metrics["sampling"]["images"] == combos
    _check_accuracies(faith["generated"]["all"], n=combos)
    _check_accuracies(faith["generated"]["held_out"], n=held)
    _check_accuracies(faith["generated"]["seen"], n=combos - held)
    _check_accuracies(faith["baseline"]["all"], n=combos)
    # the measurement itself is trustworthy on real images whatever the (barely trained) model draws
    real = faith["real"]["all"]
    assert real["n"] == 128
    assert min(real["color"], real["shape"], real["position"]) >= 0.95
    assert faith["held_out_combinations"] == [list(c) for c in cfg.synth.held_out_combinations()]

    # the samples are re-scorable by `sdray evaluate` and the report links the pictures
    manifest = (tmp_path / "run" / "samples" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == combos
    text = (report / "report.md").read_text()
    assert "(grid.png)" in text and "(loss_curves.png)" in text and "held_out" in text


def test_existing_run_directory_is_refused_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "old.txt").write_text("stale")

    assert demo_cli.main(["--quick", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run) in err and "--overwrite" in err
    assert (run / "report" / "old.txt").exists()

    prepare_output(DemoOptions(output=str(run), overwrite=True))
    assert run.is_dir() and not any(run.iterdir())


def test_overwrite_refuses_a_directory_that_is_not_a_demo_run(tmp_path):
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="does not look like a demo run"):
        prepare_output(DemoOptions(output=str(other), overwrite=True))
    assert (other / "thesis.tex").read_text() == "precious"


def test_options_are_validated_and_quick_caps_sampling():
    with pytest.raises(ConfigError, match="sampler_steps"):
        DemoOptions(sampler_steps=0)
    with pytest.raises(ConfigError, match="guidance_scale"):
        DemoOptions(guidance_scale=0.5)
    quick = DemoOptions(quick=True).effective()
    assert (quick.samples_per_prompt, quick.sampler_steps, quick.num_real) == (1, 4, 128)
    assert quick.max_images == QUICK_IMAGES
    assert DemoOptions().effective() == DemoOptions()


def test_report_reads_typed_results_without_importing_the_runner(tmp_path):
    """report.py and run.py no longer import each other; the report reads typed per-stage results."""
    import ast
    from pathlib import Path

    from sdray.demo import report
    from sdray.demo.results import DataResult, DemoResults, DemoRun, GenerateResult, UnetResult, VaeResult

    tree = ast.parse(Path(report.__file__).read_text())
    assert "sdray.demo.run" not in {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    results = DemoResults(
        data=DataResult(images=8, held_out=1),
        vae=VaeResult(psnr_db=20.0, steps=3, train_seconds=1.0, scaling_factor=0.5, history=[{"step": 3}]),
        preprocess={"rows_in": 8, "rows_written": 8, "rows_rejected": 0, "shards": 1, "bytes_written": 9},
        unet=UnetResult(steps=4, model="m", final_loss=0.25, history=[{"step": 4, "loss": 0.25, "lr": 1.0}]),
        generate=GenerateResult(images=[None, None], prompts=[]),  # type: ignore[list-item]
        faithfulness={"baseline_kind": "x", "recovered": [1]},
    )
    run = DemoRun(out=tmp_path, cfg=demo_config("demo", [], quick=True), opts=DemoOptions(), results=results)
    metrics = report.report_metrics(run)
    assert metrics["vae"] == {"psnr_db": 20.0, "steps": 3, "train_seconds": 1.0, "scaling_factor": 0.5}
    assert metrics["unet"] == {"steps": 4, "model": "m", "final_loss": 0.25}
    assert metrics["data"] == {"images": 8, "held_out": 1} and metrics["sampling"]["images"] == 2
    assert metrics["preprocess"] == {"rows_in": 8, "rows_written": 8, "rows_rejected": 0, "shards": 1}
    assert metrics["faithfulness"] == {"baseline_kind": "x"}
