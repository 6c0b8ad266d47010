"""Prompt files: discovery, reading (.parquet, .jsonl, .txt) and per-row checks.

Each prompt file is one *unit* of work, as an input parquet file is in preprocessing: the grain of resume
(finished files are skipped) and of output shards. Columns (JSONL keys) other than ``COLUMNS`` are an error
for the whole file (a typo such as ``sed`` would otherwise silently fall back to defaults); a bad value is a
rejected row with a reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sdray import storage
from sdray.batchgen.config import BatchGenerateConfig
from sdray.errors import InputError
from sdray.preprocess.inputs import InputFile
from sdray.serve.config import ServeConfig
from sdray.serve.request import GenerationRequest, ModelInfo, check_request

SUFFIXES = (".parquet", ".jsonl", ".txt")
COLUMNS = (
    "id", "prompt", "negative_prompt", "seed", "steps", "size", "width", "height", "guidance_scale", "scheduler",
)  # fmt: skip
INT_FIELDS = ("seed", "steps", "width", "height")
# Reject reasons (besides `invalid_<field>` from the request checks).
BAD_JSON = "bad_json"
"""A JSONL line that is not a JSON object."""
BAD_VALUE = "bad_value"
"""A value of the wrong type (e.g. a seed that is not an integer, a size that is not WIDTHxHEIGHT)."""
MISSING_PROMPT = "missing_prompt"
"""The prompt is null or blank."""
DUPLICATE_ID = "duplicate_id"
"""A second row with an id already used in the same file."""


@dataclass(frozen=True)
class RowChecks:
    """What a row is checked against: defaults, the model's limits, the serve limits, a token counter."""

    defaults: BatchGenerateConfig
    info: ModelInfo
    limits: ServeConfig
    count_tokens: Any  # Callable[[str], int]


def resolve_prompt_files(spec: str) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Comma-separated files or directories (their .parquet/.jsonl/.txt files) -> sorted unique files."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InputError("no prompts given (batch_generate.prompts / --prompts)")
    found: dict[str, InputFile] = {}
    fs = None
    for item in items:
        item_fs, path = _resolve(item)
        if fs is not None and type(item_fs) is not type(fs):
            raise InputError(f"prompt files {items} mix file systems; give one kind of location per run")
        fs = item_fs
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"prompts {item!r} do not exist")
        if info.is_file:
            if not info.path.endswith(SUFFIXES):
                raise InputError(f"prompts {item!r}: unsupported file type (use {', '.join(SUFFIXES)})")
            infos = [info]
        else:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file]
            infos = [i for i in infos if i.path.endswith(SUFFIXES) and not i.base_name.startswith(("_", "."))]
            if not infos:
                raise InputError(f"prompts {item!r}: no {', '.join(SUFFIXES)} files in it")
        found.update({i.path: InputFile.from_info(i) for i in infos})
    return fs, sorted(found.values(), key=lambda f: f.path)


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return storage.resolve(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"cannot open prompts {uri!r}: {exc}") from exc


def read_records(fs: pafs.FileSystem, path: str) -> list[dict[str, Any] | str]:
    """The raw rows of one prompt file: dicts, or for an unparseable JSONL line its error text."""
    with fs.open_input_file(path) as f:
        data = f.read()
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: not a readable parquet file: {exc}") from exc
        _check_columns(table.column_names, path)
        if "prompt" not in table.column_names:
            raise InputError(f"{path}: no 'prompt' column (columns: {', '.join(table.column_names)})")
        return table.to_pylist()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {exc}") from exc
    if path.endswith(".txt"):  # one prompt a line; blank lines are not rows
        return [{"prompt": line.strip()} for line in lines if line.strip()]
    records: list[dict[str, Any] | str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(f"line {number}: {exc}")
            continue
        if not isinstance(record, dict):
            records.append(f"line {number}: expected a JSON object, got {type(record).__name__}")
            continue
        _check_columns(list(record), f"{path} line {number}")
        records.append(record)
    return records


def _check_columns(names: list[str], where: str) -> None:
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise InputError(f"{where}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")


def default_seed(base: int, row_id: str) -> int:
    """A stable seed for a row without one: the same row always draws the same image, rows differ."""
    return int(hashlib.sha1(f"{base}:{row_id}".encode()).hexdigest()[:15], 16)


def parse_row(record: dict[str, Any], row_id: str, checks: RowChecks) -> dict[str, Any]:
    """One record -> the resolved row (every parameter filled in). Raises ValueError(reason, detail)."""
    d = checks.defaults
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(MISSING_PROMPT, f"prompt is {prompt!r}")
    values = {k: v for k, v in record.items() if v is not None}
    for name in INT_FIELDS:
        if name in values and (isinstance(values[name], bool) or not isinstance(values[name], int)):
            raise ValueError(BAD_VALUE, f"{name} must be an integer, got {values[name]!r}")
    if "size" in values:
        width, _, height = str(values["size"]).lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(BAD_VALUE, f"size must be WIDTHxHEIGHT, got {values['size']!r}")
        values.setdefault("width", int(width))
        values.setdefault("height", int(height))
    row = {
        "id": row_id,
        "prompt": prompt,
        "negative_prompt": str(values.get("negative_prompt", "")),
        "seed": int(values.get("seed", default_seed(d.seed, row_id))),
        "steps": int(values.get("steps", d.steps)),
        "width": int(values.get("width", d.width or checks.info.native_size)),
        "height": int(values.get("height", d.height or checks.info.native_size)),
        "guidance_scale": float(values.get("guidance_scale", d.guidance_scale)),
        "scheduler": str(values.get("scheduler", d.scheduler)),
    }
    errors = check_request(to_request(row), checks.info, checks.limits, checks.count_tokens)
    if errors:
        field, message = errors[0]
        raise ValueError(f"invalid_{field}", f"{field} {message}")
    return row


def to_request(row: dict[str, Any]) -> GenerationRequest:
    """The sampler's request for one resolved row (one image)."""
    return GenerationRequest(
        prompt=row["prompt"],
        seeds=(int(row["seed"]),),
        width=int(row["width"]),
        height=int(row["height"]),
        steps=int(row["steps"]),
        guidance_scale=float(row["guidance_scale"]),
        scheduler=str(row["scheduler"]),
        negative_prompt=row["negative_prompt"],
    )


def load_prompt_file(
    fs: pafs.FileSystem, file: InputFile, checks: RowChecks
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(good rows, reject records) of one prompt file; every row is in exactly one of them.

    Rows get ``unit`` = the file's path; ids default to ``<file stem>-<row index>``.
    """
    stem = file.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    good: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    seen: set[str] = set()
    for index, record in enumerate(read_records(fs, file.path)):
        row_id = f"{stem}-{index:06d}"
        try:
            if isinstance(record, str):
                raise ValueError(BAD_JSON, record)
            if record.get("id") is not None:
                row_id = str(record["id"])
            if row_id in seen:
                raise ValueError(DUPLICATE_ID, f"id {row_id!r} appears twice")
            seen.add(row_id)
            good.append({**parse_row(record, row_id, checks), "unit": file.path})
        except ValueError as exc:
            reason, detail = exc.args
            rejected.append({"id": row_id, "reason": reason, "detail": detail, "input": file.path})
    return good, rejected


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The good rows as the table the sampler actors read."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


SAMPLING_FIELDS = [
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("scheduler", pa.string()),
]
"""What made an image besides its prompt: in every prompt row and beside every generated image."""
ROW_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), *SAMPLING_FIELDS, ("unit", pa.string())]
)
