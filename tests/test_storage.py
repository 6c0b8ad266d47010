"""The storage layer on the local disk (object stores: tests/test_s3.py), and the package's layering."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest

from sdray import storage
from sdray.errors import InputError

SDRAY = Path(__file__).resolve().parent.parent / "sdray"


def test_write_read_append_list_remove(tmp_path):
    uri = str(tmp_path / "run")
    assert not storage.exists(uri)
    storage.write_text(storage.join(uri, "a", "x.json"), "{}")
    storage.append_bytes(storage.join(uri, "log.jsonl"), b"1\n")
    storage.append_bytes(storage.join(uri, "log.jsonl"), b"2\n")
    assert storage.read_bytes(storage.join(uri, "log.jsonl")) == b"1\n2\n"
    assert [i.base_name for i in storage.list_files(uri)] == ["x.json", "log.jsonl"]
    assert [i.base_name for i in storage.list_files(uri, recursive=False)] == ["log.jsonl"]
    assert not list(tmp_path.rglob(".*tmp-*"))  # no temp file left behind by the atomic write
    storage.remove(storage.join(uri, "a"))
    storage.remove(storage.join(uri, "missing"))  # nothing there: no error
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["log.jsonl"]


def test_location_is_picklable_and_relative(tmp_path):
    where = pickle.loads(pickle.dumps(storage.Location(tmp_path / "c")))
    assert where.read_text("none.txt") is None
    assert where.write_bytes("_manifest/k.json", b"[]") == 2
    assert (
        where.exists("_manifest/k.json") and (tmp_path / "c" / "_manifest" / "k.json").read_bytes() == b"[]"
    )


def test_glob_stays_in_one_folder_unless_double_star(tmp_path):
    for name in ["a/1.parquet", "a/b/2.parquet", "c/3.parquet"]:
        storage.write_bytes(tmp_path / name, b"x")
    fs, root = storage.resolve(tmp_path)
    names = lambda pattern: [i.path.removeprefix(root + "/") for i in storage.glob(fs, f"{root}/{pattern}")]  # noqa: E731
    assert names("*/*.parquet") == ["a/1.parquet", "c/3.parquet"]
    assert names("a/**.parquet") == ["a/1.parquet", "a/b/2.parquet"]


def test_parquet_files_of_a_file_a_folder_and_a_glob(tmp_path):
    for name in ["d/1.parquet", "d/sub/2.parquet", "d/_manifest.parquet", "d/.tmp.parquet", "d/notes.txt"]:
        storage.write_bytes(tmp_path / name, b"x")
    fs, root = storage.resolve(tmp_path)

    def names(path: str) -> list[str]:
        return [i.path.removeprefix(root + "/") for i in storage.parquet_files(fs, f"{root}/{path}")]

    assert names("d") == ["d/1.parquet", "d/sub/2.parquet"]  # recursive; metadata and temp files left out
    assert names("d/*.parquet") == ["d/1.parquet"]
    assert names("d/notes.txt") == ["d/notes.txt"]  # a file named outright is taken as it is
    assert names("d/sub/*.jpg") == []
    with pytest.raises(FileNotFoundError):
        names("nope")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):  # fails while writing the temp file: it is removed, nothing is renamed
        storage.write_bytes(tmp_path / "f.bin", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_staged_directory_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), storage.staged_dir(str(target)) as staged:
        (staged / "half.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old export, and no staging left behind
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with storage.staged_dir(str(target)) as staged:
        assert staged.parent == tmp_path  # beside the target: renamed into place, not copied
        (staged / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_a_staged_directory_gets_the_permissions_of_a_mkdir(tmp_path, umask, mode):
    """Not mkdtemp's 0700: an export or a cache must be readable where the user's umask lets mkdir's be."""
    before = os.umask(umask)
    try:
        with storage.staged_dir(str(tmp_path / "model")) as staged:
            (staged / "f.txt").write_text("x")
    finally:
        os.umask(before)
    assert (tmp_path / "model").stat().st_mode & 0o777 == mode


def test_bad_uri_is_an_input_error():
    with pytest.raises(InputError, match="cannot open 'nosuch://x'"):
        storage.resolve("nosuch://x")


def _sdray_imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for file in (SDRAY / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdray"):
                found |= {(file.name, f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {(file.name, a.name) for a in node.names if a.name.startswith("sdray")}
    return found


@pytest.mark.parametrize("package", ["data", "models", "vae"])
def test_lower_layers_do_not_import_the_stages(package):
    """data/models/vae sit below train and preprocess: they get paths and files from sdray.storage."""
    upward = (
        "sdray.train",
        "sdray.serve",
        "sdray.demo",
        "sdray.evaluate",
        "sdray.pipeline_config",
        "sdray.preprocess",
    )
    bad = sorted((f, m) for f, m in _sdray_imports(package) if m.startswith(upward))
    assert bad == []
