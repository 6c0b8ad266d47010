"""`run_dreambooth`: the one library call behind `sdray dreambooth` (https://arxiv.org/abs/2208.12242).

1. write the instance images as one image parquet, every row captioned with the instance prompt
2. prior preservation: generate the class images from the base model with `batch-generate` (no LoRA)
3. preprocess instance and class images with the same encoders and settings (two latent caches); the
   instance set is preprocessed while the class images are generated (both on Ray, from two threads)
4. train on the instance cache, pairing every batch with class rows (`train.class_data`)
Every step is resumable, so rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sdray import storage
from sdray.dreambooth.config import DreamBoothConfig
from sdray.errors import InputError
from sdray.pipeline_config import PipelineConfig
from sdray.preprocess.manifest import OutputDir

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INSTANCE_DIR, CLASS_PROMPTS, CLASS_IMAGES = "instance", "class_prompts.jsonl", "class_images"
INSTANCE_CACHE, CLASS_CACHE, RUN_DIR = "instance_cache", "class_cache", "run"
# The image-set layout both the instance set and batch-generate's output use.
COLUMNS = {"id_column": "id", "image_column": "image", "caption_column": "caption"}
_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _images_from_folder(fs: pafs.FileSystem, root: str) -> list[dict[str, Any]]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.lower().endswith(IMAGE_SUFFIXES))
    rows = []
    for path in files:
        with fs.open_input_file(path) as f:
            name = path[len(root) :].lstrip("/")
            rows.append({"id": name, "image": {"bytes": f.read(), "path": name}})
    return rows


def _images_from_parquet(fs: pafs.FileSystem, paths: list[str], image_column: str) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        table = pq.read_table(path, filesystem=fs)
        if image_column not in table.column_names:
            raise InputError(
                f"{path}: no image column {image_column!r} (columns: {', '.join(table.column_names)})"
            )
        for index, value in enumerate(table.column(image_column).to_pylist()):
            data = value.get("bytes") if isinstance(value, dict) else value
            name = f"{path.rsplit('/', 1)[-1]}-{index:06d}"
            rows.append({"id": name, "image": {"bytes": data, "path": name}})
    return rows


def instance_table(db: DreamBoothConfig, image_column: str) -> pa.Table:
    """The instance images (folder or parquet) as ``id``, ``image`` struct, ``caption`` = the instance prompt."""
    fs, root = storage.resolve(db.instance_data)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"dreambooth.instance_data {db.instance_data!r} does not exist")
    if info.is_file:
        rows = _images_from_parquet(fs, [root], image_column)
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        parquet = sorted(i.path for i in infos if i.is_file and i.path.endswith(".parquet"))
        rows = _images_from_parquet(fs, parquet, image_column) if parquet else _images_from_folder(fs, root)
    if not rows:
        raise InputError(
            f"dreambooth.instance_data {db.instance_data!r}: no images ({', '.join(IMAGE_SUFFIXES)} or parquet)"
        )
    schema = pa.schema([("id", pa.string()), ("image", _STRUCT), ("caption", pa.string())])
    return pa.Table.from_pylist([{**r, "caption": db.instance_prompt} for r in rows], schema=schema)


def class_prompt_lines(db: DreamBoothConfig) -> bytes:
    """``num_class_images`` rows of the class prompt, seeds 0..n-1: the same class set on every rerun."""
    rows = [
        {"id": f"class-{i:06d}", "prompt": db.class_prompt, "seed": i} for i in range(db.num_class_images)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _put_if_changed(work: OutputDir, name: str, data: bytes) -> None:
    """Rewrite a generated input only when its content changes: preprocessing and batch generation treat a
    rewritten file (new mtime) as changed, which would refuse the resume."""
    if not work.exists(name) or work.read_bytes(name) != data:
        work.write_bytes(name, data)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _preprocess(cfg: PipelineConfig, source: str, target: str, label: str) -> dict[str, Any]:
    from sdray.preprocess.run import run_preprocess

    pre = dataclasses.replace(cfg.preprocess, input=source, output=target, **COLUMNS)
    summary = run_preprocess(dataclasses.replace(cfg, preprocess=pre), label=label)
    if summary["rows_written"] < 1:
        raise InputError(f"{source}: no image survived preprocessing (see {target}/_rejects)")
    return summary


def _class_images(cfg: PipelineConfig, work: OutputDir) -> dict[str, Any]:
    """Generate the class images from the base model; refuse a run where none came out."""
    from sdray.batchgen.run import run_batch_generate

    _put_if_changed(work, CLASS_PROMPTS, class_prompt_lines(cfg.dreambooth))
    gen = dataclasses.replace(
        cfg.batch_generate,
        prompts=storage.join(work.uri, CLASS_PROMPTS),
        output=storage.join(work.uri, CLASS_IMAGES),
        loras=(),  # the prior is the base model's
    )
    summary = run_batch_generate(dataclasses.replace(cfg, batch_generate=gen))
    if summary["rows_written"] < 1:
        raise InputError(
            f"prior preservation with no class images: all {summary['rows_in']} class prompts were rejected "
            f"({summary['rejected_by_reason']}; see {gen.output}/_rejects)"
        )
    return summary


def _beside(background: Callable[[], T], foreground: Callable[[], object]) -> T:
    """Run ``foreground`` here while ``background`` runs on a daemon thread; ``background``'s result.

    An error of ``foreground`` is raised at once: the command then ends, and the background work stops with
    the process (what it committed stays committed: preprocessing resumes). Otherwise an error of
    ``background`` is raised once it is done."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = background()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="sdray-dreambooth-instance", daemon=True)
    thread.start()
    foreground()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_dreambooth(cfg: PipelineConfig) -> dict[str, Any]:
    """Instance set, class images, both caches, then prior-preserving training; returns a summary."""
    from sdray.cluster import ensure_ray
    from sdray.train.run import run_training

    db = cfg.dreambooth
    db.check()
    work = OutputDir(db.output)
    instance = instance_table(db, cfg.preprocess.image_column)
    _put_if_changed(work, f"{INSTANCE_DIR}/part-00000.parquet", _table_bytes(instance))
    summary: dict[str, Any] = {"instance_images": instance.num_rows}
    train = dataclasses.replace(
        cfg.train,
        data=storage.join(work.uri, INSTANCE_CACHE),
        output=cfg.train.output or storage.join(work.uri, RUN_DIR),
        class_data="",
    )

    def instance_cache() -> dict[str, Any]:
        return _preprocess(cfg, storage.join(work.uri, INSTANCE_DIR), train.data, "preprocess instance")

    def class_cache() -> None:
        summary["class_images"] = _class_images(cfg, work)["rows_written"]
        _preprocess(
            cfg, storage.join(work.uri, CLASS_IMAGES), storage.join(work.uri, CLASS_CACHE), "preprocess class"
        )

    if db.prior_preservation:
        ensure_ray()  # here: ray.init may only swap signal handlers on the main thread
        _beside(instance_cache, class_cache)
        train = dataclasses.replace(train, class_data=storage.join(work.uri, CLASS_CACHE))
    else:
        instance_cache()
    result = run_training(train, cfg.model)
    return {**summary, "step": result.step, "run": result.output, "model": result.model, **result.metrics}
