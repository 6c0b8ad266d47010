"""VAE stage end to end on real Ray Train: tiny synth set -> 2 DDP workers -> diffusers VAE dir + PSNR."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from tracking_fixtures import tensorboard_steps

from sdray.errors import InputError
from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.pipeline_config import load_pipeline_config
from sdray.tracking.config import TrackingConfig
from sdray.vae.config import VaeTrainConfig
from sdray.vae.data import decode_image, image_datasets, in_holdout, to_model_input
from sdray.vae.export import assemble_model_dir
from sdray.vae.loss import psnr, reconstruct


def _held_out_images(data_dir, cfg: VaeTrainConfig) -> torch.Tensor:
    rows = pq.read_table(data_dir, columns=["id", "image"]).to_pylist()
    pixels = [
        decode_image(r["image"]["bytes"], cfg.resolution)
        for r in rows
        if in_holdout(r["id"], cfg.holdout_fraction)
    ]
    return to_model_input(torch.from_numpy(np.stack(pixels)))


@pytest.mark.slow
def test_train_vae_two_workers_exports_loadable_vae(ray_session, synth_dir, tmp_path):
    from sdray.vae.train import train_vae

    model_cfg = load_pipeline_config("demo").model
    cfg = VaeTrainConfig(data=str(synth_dir), output=str(tmp_path / "run"), num_workers=2, batch_size=4,
                         max_steps=6, report_every=3, holdout_fraction=0.1, foreground_weight=10.0,
                         learning_rate=2e-3, lr_warmup_steps=2, scaling_images=32)  # fmt: skip
    result = train_vae(cfg, model_cfg, TrackingConfig(mlflow=True, tensorboard=True))

    # 1. metrics: one report every 3 steps, PSNR reported and consistent everywhere
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [3, 6] and result.steps == 6
    assert metrics["psnr"] == result.psnr == metrics["history"][-1]["psnr"]
    assert 5.0 < result.psnr < 60.0
    assert [h["lr"] for h in metrics["history"]] == [2e-3, 2e-3]  # warmup over after 2 steps

    # 2. the exported directory is a diffusers AutoencoderKL of the configured architecture
    vae = AutoencoderKL.from_pretrained(str(result.vae_dir), use_safetensors=True)
    assert tuple(vae.config.block_out_channels) == (16, 32, 32)
    assert vae.config.scaling_factor == pytest.approx(result.scaling_factor) and result.scaling_factor > 0
    assert vae.config.scaling_factor != pytest.approx(0.18215)

    # 3. the loaded weights reproduce the reported held-out PSNR (same images, posterior mean)
    images = _held_out_images(synth_dir, cfg)
    assert psnr(reconstruct(vae.eval(), images), images).mean().item() == pytest.approx(result.psnr, abs=0.01)

    # 4. a full model directory around it loads through model.path, with this VAE inside
    model_dir = assemble_model_dir(result.vae_dir, model_cfg, tmp_path / "model")
    loaded = load_components(ModelConfig(path=str(model_dir)))
    assert loaded.vae_downsample == 4 and loaded.text_embed_dim == 64
    assert torch.equal(loaded.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert (tmp_path / "run" / "config.yaml").is_file()

    # 5. tracked in the run directory's own MLflow store and TensorBoard events, at the reported steps
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["vae_train.max_steps"] == "6"
    assert run.data.tags["sdray.stage"] == "train-vae"
    psnr_history = sorted(client.get_metric_history(run_id, "psnr"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in psnr_history] == [(h["step"], h["psnr"]) for h in metrics["history"]]
    assert "model/config.json" in {a.path for a in client.list_artifacts(run_id, "model")}
    assert (tmp_path / "run" / "mlartifacts").is_dir()  # artifacts stay inside the run directory
    assert tensorboard_steps(tmp_path / "run" / "tensorboard")["vae/psnr"] == [3, 6]

    # 6. the images were read a task per file: Ray's default parquet reader starts footer-reading actors at
    # every pass over the data (~3 s of CPU each; ~10 per run here)
    from ray._private.state import actors  # the GCS actor table of the session, dead actors included

    assert "FooterReader" not in {info["ActorClassName"].rpartition(".")[2] for info in actors().values()}


def test_cli_missing_data_exits_2(tmp_path, capsys):
    from pipelines.train_vae import main

    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert f"error: vae_train.data {tmp_path / 'nope'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_without_parquet_or_without_the_image_column_is_named_before_ray_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"vae_train.data .*empty: no .parquet files"):
        image_datasets(VaeTrainConfig(data=str(tmp_path / "empty")))
    (tmp_path / "captions").mkdir()
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "captions" / "part-0.parquet")
    with pytest.raises(InputError, match=r"part-0.parquet: missing column\(s\) \['image'\]"):
        image_datasets(VaeTrainConfig(data=str(tmp_path / "captions")))


def test_model_dir_that_holds_something_else_is_refused_before_training(tmp_path, capsys):
    from pipelines.train_vae import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.parquet").write_bytes(b"x")
    args = [
        "--data",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "run"),
        "--model-dir",
        str(tmp_path / "mine"),
    ]
    assert main(args) == 2
    assert "mine is not empty (data.parquet) and is not a model directory" in capsys.readouterr().err
    assert (tmp_path / "mine" / "data.parquet").exists()
