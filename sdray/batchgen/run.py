"""`run_batch_generate`: the one library call behind `sdray batch-generate`.

1. resolve the prompt files and open the output directory (refuse one made by another model or LoRA set)
2. skip prompt files the manifest marks done; delete leftovers of the others (a killed run)
3. read and check the pending files in the driver: bad rows go to the reject log with a reason
4. stream the good rows through Ray Data (sampler actor pool -> write shards), committing each prompt file to
   the manifest as soon as all its rows are written or rejected
5. write and return the summary: rows in, written, rejected by reason, and this run's images/s
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from sdray.batchgen.prompts import RowChecks, load_prompt_file, resolve_prompt_files, rows_table
from sdray.cluster import ensure_ray
from sdray.config import dump_yaml
from sdray.data.cache import CONFIG_FILE, SUMMARY_FILE
from sdray.errors import ConfigError
from sdray.models.config import ModelConfig, architecture
from sdray.models.lora import LoraSpec
from sdray.pipeline_config import PipelineConfig
from sdray.preprocess.dataset import build_generation_dataset
from sdray.preprocess.manifest import OutputDir, totals
from sdray.preprocess.run import Ledger
from sdray.preprocess.stages import EVENT_SCHEMA
from sdray.serve.request import ModelInfo

log = logging.getLogger(__name__)

SOURCE_FILE = "_generated_by.json"


def model_info(model_cfg: ModelConfig) -> tuple[ModelInfo, Any]:
    """(ModelInfo, tokenizer) from the configs and the tokenizer alone: no weights are built in the driver, and
    diffusers is not imported (~10 s of CPU before the sampler actors could start)."""
    from sdray.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    factor = 2 ** (len(architecture(model_cfg, "vae")["block_out_channels"]) - 1)
    info = ModelInfo(
        source=model_cfg.source,
        native_size=int(architecture(model_cfg, "unet")["sample_size"]) * factor,
        size_multiple=factor,
        max_tokens=int(tokenizer.model_max_length),
    )
    return info, tokenizer


def check_loras(model_cfg: ModelConfig, specs: tuple[str, ...]) -> None:
    """Refuse a missing LoRA directory or weights file, or an adapter for another base, in the driver
    (a weightless meta-device UNet), before any actor starts: there it would be a remote traceback."""
    if not specs:
        return
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sdray.models.lora import check_fits, weights_file

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(architecture(model_cfg, "unet"))
    for spec in (LoraSpec.parse(text) for text in specs):
        file = weights_file(spec.path)
        state, _ = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, use_safetensors=True, local_files_only=True
        )
        check_fits(unet, state, str(file))


def _with_absolute_loras(cfg: PipelineConfig) -> PipelineConfig:
    """Sampler actors may run in another working directory (a cluster the command attached to)."""
    loras = tuple(str(LoraSpec.parse(text).absolute()) for text in cfg.batch_generate.loras)
    return dataclasses.replace(cfg, batch_generate=dataclasses.replace(cfg.batch_generate, loras=loras))


def _check_source(out: OutputDir, source: dict[str, Any]) -> None:
    """Images of one output directory come from one model and LoRA set; refuse to mix them on resume."""
    text = out.read_text(SOURCE_FILE)
    if text is not None and json.loads(text) != source:
        raise ConfigError(
            f"output {out.uri} holds images made by {json.loads(text)}, now {source}; "
            "write to a new output directory"
        )
    out.write_bytes(SOURCE_FILE, json.dumps(source, indent=1).encode())


def _reject_events(rejected: list[dict[str, str]]) -> pa.Table:
    rows = [
        {"unit": r["input"], "kind": "reject", "name": r["id"], "rows": 0, "reason": r["reason"],
         "detail": r["detail"], "bytes": 0, "decode_s": 0.0, "encode_s": 0.0, "write_s": 0.0, "long_captions": 0}
        for r in rejected
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def _process(cfg: PipelineConfig, out: OutputDir, pending: list, loaded: dict[str, Any]) -> Ledger:
    ledger = Ledger(out, pending, {path: len(g) + len(r) for path, (g, r) in loaded.items()})
    ledger.add(_reject_events([r for _, rejected in loaded.values() for r in rejected]))
    good = [row for rows, _ in loaded.values() for row in rows]
    # Rows of one bucket (steps, size, guidance, scheduler) side by side share UNet calls.
    good.sort(
        key=lambda r: (r["unit"], r["steps"], r["width"], r["height"], r["guidance_scale"], r["scheduler"])
    )
    if good:
        ensure_ray()
        with tqdm(total=len(good), desc="batch-generate", unit="img") as progress:
            for events in build_generation_dataset(cfg, rows_table(good), out).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                ledger.add(events)
                progress.update(sum(events.column("rows").to_pylist()))
    ledger.finish()
    return ledger


def run_batch_generate(cfg: PipelineConfig) -> dict[str, Any]:
    """Generate an image per row of ``cfg.batch_generate.prompts`` into ``.output``; resumable.

    Returns:
        The summary also written to `_summary.json`: totals over the whole output and `this_run` stats.
    """
    cfg = _with_absolute_loras(cfg)
    gen = cfg.batch_generate
    out = OutputDir(gen.output)
    fs, files = resolve_prompt_files(gen.prompts)
    info, tokenizer = model_info(cfg.model)
    check_loras(cfg.model, gen.loras)
    checks = RowChecks(
        defaults=gen,
        info=info,
        limits=cfg.serve,
        count_tokens=lambda text: len(tokenizer(text, truncation=False).input_ids),
    )
    pending = out.pending(files, out.done())
    # Every pending file is read and checked before anything is written: a bad file leaves no trace.
    loaded = {f.path: load_prompt_file(fs, f, checks) for f in pending}
    _check_source(out, {"model": cfg.model.source, "loras": list(gen.loras)})
    out.write_bytes(CONFIG_FILE, dump_yaml(cfg).encode())
    _, pending = out.resume(files, "prompt")
    start = time.perf_counter()
    ledger = _process(cfg, out, pending, loaded) if pending else None
    wall = time.perf_counter() - start
    summary = {**totals(out.done()), "this_run": _run_stats(ledger, wall)}
    out.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return summary


def _run_stats(ledger: Ledger | None, wall: float) -> dict[str, Any]:
    records = ledger.committed if ledger else []
    written = sum(r.written for r in records)
    return {
        "prompt_files": len(records),
        "rows_in": sum(r.rows for r in records),
        "images_written": written,
        "wall_s": round(wall, 3),
        "images_per_s": round(written / wall, 3) if written and wall > 0 else 0.0,
        "sample_task_s": round(ledger.stage_s.get("encode_s", 0.0), 3) if ledger else 0.0,
    }
