"""`sdray batch-generate` on real Ray Data: prompt files of each format, rejects, resume, read back by preprocess."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.batch_generate import main as batch_generate_main
from sdray.batchgen.run import run_batch_generate
from sdray.pipeline_config import load_pipeline_config
from sdray.preprocess.run import run_preprocess

STEPS = 2


def _config(prompts: str, output: Path, **gen):
    cfg = load_pipeline_config("tiny", [f"batch_generate.steps={STEPS}", "batch_generate.batch_size=2"])
    gen = dataclasses.replace(cfg.batch_generate, prompts=prompts, output=str(output), **gen)
    return dataclasses.replace(cfg, batch_generate=gen)


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    (root / "a.txt").write_text("a large red circle\n\na small blue square\n")  # blank lines are not rows
    lines = [
        {"id": "tri", "prompt": "a green triangle", "seed": 3, "steps": 3, "size": "64x64"},
        {"prompt": "too many steps", "steps": 10_000},  # rejected: invalid_steps
        {"prompt": "   "},  # rejected: missing_prompt
    ]
    (root / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    return root


@pytest.fixture(scope="module")
def generated(ray_session, prompt_dir, tmp_path_factory):
    """First run: the .txt and .jsonl files; then a parquet file is added and the run resumed."""
    out = tmp_path_factory.mktemp("gen") / "images"
    first = run_batch_generate(_config(f"{prompt_dir / 'a.txt'},{prompt_dir / 'b.jsonl'}", out))
    shard_times = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    table = pa.table({"id": ["p0", "p1"], "prompt": ["a white star", "a black ring"], "seed": [7, 8]})
    pq.write_table(table, prompt_dir / "c.parquet")
    second = run_batch_generate(_config(str(prompt_dir), out))
    return out, first, second, shard_times


def test_every_row_is_an_image_or_a_reject_with_a_reason(generated):
    out, first, _, _ = generated
    assert first["rows_in"] == 6 and first["rows_written"] == 3 and first["rows_rejected"] == 3
    assert first["rejected_by_reason"] == {"bad_json": 1, "invalid_steps": 1, "missing_prompt": 1}
    rejects = [
        json.loads(line) for f in (out / "_rejects").glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    assert {r["reason"]: r["id"] for r in rejects} == {
        "invalid_steps": "b-000001", "missing_prompt": "b-000002", "bad_json": "b-000003",
    }  # fmt: skip
    assert all(r["input"].endswith("b.jsonl") and r["detail"] for r in rejects)


def test_resume_skips_finished_files_and_adds_the_new_one(generated):
    out, _, second, shard_times = generated
    assert second["this_run"]["prompt_files"] == 1 and second["this_run"]["images_written"] == 2
    assert second["rows_written"] == 5 and second["input_files"] == 3
    # the first run's shards were not rewritten
    assert {
        p: t
        for p, t in ((p.name, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet"))
        if p in shard_times
    } == shard_times


def test_rows_carry_their_parameters_and_match_the_sampler(generated, tiny_components):
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler

    out, _, _, _ = generated
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"a-000000", "a-000001", "tri", "p0", "p1"}
    tri = rows["tri"]
    assert (tri["caption"], tri["seed"], tri["steps"], tri["width"], tri["height"]) == (
        "a green triangle",
        3,
        3,
        64,
        64,
    )
    assert rows["a-000000"]["steps"] == STEPS and rows["p1"]["seed"] == 8
    assert rows["a-000000"]["seed"] != rows["a-000001"]["seed"]  # derived seeds differ per row
    req = GenerationRequest("a green triangle", (3,), 64, 64, 3, tri["guidance_scale"], tri["scheduler"])
    want = Sampler(tiny_components).generate([req])[0][0]
    got = np.asarray(Image.open(io.BytesIO(tri["image"]["bytes"])), np.float32) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6  # batched in the pool == alone, up to PNG rounding


def test_output_is_preprocess_input(generated, tmp_path):
    out, _, _, _ = generated
    cfg = load_pipeline_config("tiny", [f"preprocess.input={out}", f"preprocess.output={tmp_path / 'cache'}"])
    summary = run_preprocess(cfg)
    assert summary["rows_in"] == 5 and summary["rows_written"] == 5
    captions = set(pq.read_table(tmp_path / "cache", columns=["caption"]).column("caption").to_pylist())
    assert captions == {
        "a large red circle",
        "a small blue square",
        "a green triangle",
        "a white star",
        "a black ring",
    }


def test_unknown_column_is_exit_2_and_writes_nothing(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "sed": 3}) + "\n")
    code = batch_generate_main(["--prompts", str(prompts), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "p.jsonl line 1: unknown column 'sed'" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_driver_checks_the_prompts_without_importing_diffusers(tmp_path):
    """Without LoRAs the driver only tokenizes: the sampler actors load the model (seconds saved per command)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "sed": 3}) + "\n")
    report = (
        "import sys; from pipelines.cli import main; code = main(sys.argv[1:]); "
        "print('diffusers' in sys.modules, 'transformers' in sys.modules); sys.exit(code)"
    )
    args = ["batch-generate", "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", report, *args], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "unknown column 'sed'" in result.stderr, result.stderr
    assert result.stdout.split() == ["False", "True"]  # the tokenizer came from transformers, nothing else


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny-UNet LoRA whose B matrices are non-zero, so it changes images."""
    import torch

    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.train.config import LoraConfig
    from sdray.train.lora import add_adapter, save_lora_dir

    unet = load_components(ModelConfig(), ["unet"]).unet
    add_adapter(unet, LoraConfig(enabled=True, rank=4, alpha=4.0), seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    out.mkdir()
    return save_lora_dir(unet.eval(), out)


def test_sampler_actor_applies_the_lora_specs(adapter_dir, tiny_components):
    from sdray.batchgen.prompts import ROW_SCHEMA
    from sdray.batchgen.stages import SamplerActor
    from sdray.config import to_dict
    from sdray.models.components import load_components
    from sdray.models.config import ModelConfig
    from sdray.models.lora import LoraSpec
    from sdray.serve.sampler import Sampler

    row = {"id": "r", "prompt": "a red circle", "negative_prompt": "", "seed": 1, "steps": STEPS, "width": 64,
           "height": 64, "guidance_scale": 5.0, "scheduler": "ddim", "unit": "u"}  # fmt: skip
    batch = {
        k: np.array([v], dtype=object)
        for k, v in pa.Table.from_pylist([row], ROW_SCHEMA).to_pylist()[0].items()
    }
    actor = SamplerActor(model=to_dict(ModelConfig()), loras=[f"{adapter_dir}:0.5"], batch_size=2, threads=1)
    got = np.asarray(Image.open(io.BytesIO(actor(batch)["png"][0])), np.float32) / 255
    from sdray.batchgen.prompts import to_request

    req = to_request(row)
    with_lora = Sampler(load_components(ModelConfig()), loras=[LoraSpec(str(adapter_dir), 0.5)]).generate(
        [req]
    )[0][0]
    plain = Sampler(tiny_components).generate([req])[0][0]
    assert np.abs(got - with_lora).max() <= 1 / 255 + 1e-6
    assert np.abs(with_lora - plain).max() > 0.02  # the adapter matters at this scale


def test_bad_lora_is_exit_2_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "empty_lora").mkdir()
    code = batch_generate_main(
        [
            "--prompts",
            str(tmp_path / "p.txt"),
            "--output",
            str(tmp_path / "out"),
            "--lora",
            str(tmp_path / "empty_lora"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: LoRA ") and "no pytorch_lora_weights.safetensors" in err
    assert not (tmp_path / "out").exists()
