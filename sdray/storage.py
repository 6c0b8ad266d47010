"""The storage layer: local paths and object-store URIs (s3://, gs://) through pyarrow file systems.

Every file sdray reads or writes outside a library's own ``save_pretrained``/``torch.save`` goes through
here; it sits below every other sdray module (it imports only :mod:`sdray.errors`). Paths are strings:
a local path (relative allowed) or a URI. Publishing is atomic: a local file or directory appears under its
final name only when complete (written under a hidden ``.NAME.tmp-*`` name, then renamed); an object-store
object is atomic per object already.

Two ways in: module functions for one-off use (``read_bytes(uri)``), and :class:`Location` for a directory
used many times (a cache, a run), which resolves its file system once and is picklable for Ray tasks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs

from sdray.errors import InputError

if TYPE_CHECKING:
    from ray.train import Checkpoint

_GLOB_CHARS = set("*?[")


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri)


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI such as ``s3://bucket/run``.

    Raises:
        InputError: the URI names an unknown scheme or cannot be opened.
    """
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"cannot open {uri!r}: {exc}") from exc


def absolute(uri: str) -> str:
    """``uri`` unchanged if it is a URI, else the absolute local path (Ray Train needs one)."""
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> int:
    """Write ``data`` to ``path``: locally via a hidden temp file renamed into place; returns its size."""
    parent, base = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if local:
            fs.move(tmp, path)
    except BaseException:
        if local and _exists(fs, tmp):
            fs.delete_file(tmp)
        raise
    return len(data)


def _append(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Append to a local file; object stores have no append, so there the object is rewritten whole."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_append_stream(path) as f:
            f.write(data)
        return
    _write(fs, path, (_read(fs, path) if _exists(fs, path) else b"") + data)


def _files(fs: pafs.FileSystem, path: str, *, recursive: bool) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    return sorted((i for i in fs.get_file_info(selector) if i.is_file), key=lambda i: i.path)


class Location:
    """A directory on any pyarrow file system, resolved once; names below it are relative (``a/b.json``).

    Picklable, so Ray tasks that write into a cache receive it as an argument.
    """

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri)
        self.fs, self.root = resolve(uri)

    def path(self, *names: str) -> str:
        """The path inside :attr:`fs` of ``names`` below the root."""
        return "/".join([self.root.rstrip("/"), *[n for n in names if n]])

    def exists(self, name: str = "") -> bool:
        return _exists(self.fs, self.path(name))

    def read_bytes(self, name: str = "") -> bytes:
        return _read(self.fs, self.path(name))

    def read_text(self, name: str = "") -> str | None:
        """The file's text, or None if it does not exist."""
        path = self.path(name)
        return _read(self.fs, path).decode() if _exists(self.fs, path) else None

    def write_bytes(self, name: str, data: bytes) -> int:
        """Publish ``data`` as ``name`` atomically; returns bytes written."""
        return _write(self.fs, self.path(name), data)

    def append_bytes(self, name: str, data: bytes) -> None:
        _append(self.fs, self.path(name), data)

    def files(self, name: str = "", *, recursive: bool = True) -> list[pafs.FileInfo]:
        """Files below ``name`` (sorted by path; none if it does not exist)."""
        return _files(self.fs, self.path(name), recursive=recursive)

    def delete(self, paths: list[str]) -> None:
        """Delete files given as paths inside :attr:`fs` (as :meth:`files` returns them)."""
        for path in paths:
            self.fs.delete_file(path)


def exists(uri: str) -> bool:
    return _exists(*resolve(uri))


def read_bytes(uri: str) -> bytes:
    return _read(*resolve(uri))


def read_tail(uri: str, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of the file at ``uri`` (all of it if shorter), without reading the rest."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        size = f.size()
        return f.read_at(min(size, max_bytes), max(0, size - max_bytes))


def write_bytes(uri: str | Path, data: bytes) -> str | Path:
    """Publish ``data`` at ``uri`` atomically; returns ``uri``."""
    _write(*resolve(uri), data)
    return uri


def write_text(uri: str | Path, text: str) -> str | Path:
    return write_bytes(uri, text.encode("utf-8"))


def append_bytes(uri: str, data: bytes) -> None:
    """Append ``data`` to the file at ``uri`` (created if missing)."""
    _append(*resolve(uri), data)


def list_files(uri: str, *, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files below the directory ``uri``, sorted by path (paths inside its file system)."""
    return _files(*resolve(uri), recursive=recursive)


def remove(uri: str) -> None:
    """Delete the file or directory at ``uri``; nothing happens if it does not exist."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def refuse_to_replace(uri: str, *, marker: str, what: str, overwrite: bool) -> None:
    """Refuse to replace ``uri`` when it is a non-empty folder without ``marker`` (so not an earlier output of
    the same kind: a data set, a training run, someone's notes), unless ``overwrite``.

    Raises:
        InputError: naming the folder and the flag that allows it.
    """
    if overwrite or not exists(uri) or exists(join(uri, marker)):
        return
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise InputError(f"{uri} exists and is not a folder; pass --overwrite to replace it with {what}")
    entries = fs.get_file_info(pafs.FileSelector(path))
    if entries:
        names = ", ".join(sorted(e.base_name for e in entries)[:5])
        raise InputError(
            f"{uri} is not empty ({names}{', ...' if len(entries) > 5 else ''}) and is not {what} "
            f"(no {marker}); pass --overwrite to replace it, or choose another folder"
        )


def glob_match(path: str, pattern: str) -> bool:
    """Shell-style: ``*``, ``?``, ``[...]`` stay within one folder; ``**`` crosses folders."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts, strict=True)
    )


def has_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def glob(fs: pafs.FileSystem, pattern: str) -> list[pafs.FileInfo]:
    """Files of ``fs`` whose path matches ``pattern`` (see :func:`glob_match`), sorted by path."""
    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if has_glob(p)), len(parts))
    base = "/".join(parts[:fixed]) or "/"
    return [i for i in _files(fs, base, recursive=True) if glob_match(i.path, pattern)]


def _is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def parquet_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The parquet files ``path`` names, sorted: the file itself, a folder's ``.parquet`` files (recursively),
    or a glob's; names starting with ``_`` or ``.`` (metadata, temp files) left out. Empty when a folder or
    glob holds none.

    Raises:
        FileNotFoundError: ``path`` is neither a glob nor an existing file or folder.
    """
    if has_glob(path):
        return [i for i in glob(fs, path) if _is_data_file(i.path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.is_file:
        return [info]
    return [i for i in _files(fs, path, recursive=True) if _is_data_file(i.path)]


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a local temp directory beside ``target``; on success rename it to ``target``, on error delete it.

    An interrupted run (exception, Ctrl-C, SIGTERM handled as SystemExit) leaves only a hidden
    ``.NAME.tmp-*`` folder, never a half-written ``target``.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        # a mkdir's permissions under the umask: mkdtemp's 0700 would hide an export from the group
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """This process's umask (read without changing it where /proc says; os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def publish_dir(local_dir: str | Path, uri: str) -> str:
    """Copy a local directory to ``uri``, replacing what is there; a local target is renamed into place."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_dir(path, overwrite=True) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return uri
    if _exists(fs, path):
        fs.delete_dir(path)
    pafs.copy_files(str(local_dir), path, destination_filesystem=fs)
    return uri


@contextlib.contextmanager
def staged_dir(uri: str) -> Iterator[Path]:
    """A local directory to write ``uri``'s files into; on success they replace what ``uri`` holds.

    A local ``uri`` is staged beside itself and renamed into place (a model export is written once, not
    written and copied); a remote one is staged in a temporary directory and uploaded.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_dir(path, overwrite=True) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="sdray-stage-") as tmp:
        yield Path(tmp)
        publish_dir(tmp, uri)


def report_checkpoint(metrics: dict, write: Callable[[Path], None], name: str | None = None) -> None:
    """``ray.train.report`` of ``metrics`` with a checkpoint named ``name``, whose files ``write`` puts in
    the (empty) directory it is given.

    Ray copies a reported checkpoint from where it was written into the run's storage. When that storage is
    this machine's disk, the files are written beside their destination and renamed into it instead (sd15's
    10 GB of weights and optimizer state: one write instead of a write and a copy); object storage, or a
    storage folder this node cannot see, gets Ray's own upload.
    """
    import ray.train

    run = ray.train.get_context().get_storage()  # DeveloperAPI: the run's filesystem and folder
    local = isinstance(run.storage_filesystem, pafs.LocalFileSystem) and os.path.isdir(run.experiment_fs_path)

    def rename_into_storage(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        target = Path(run.build_checkpoint_path_from_name(dir_name))
        target.mkdir(parents=True, exist_ok=True)  # every rank adds its files to one directory
        for file in Path(checkpoint.path).iterdir():
            os.replace(file, target / file.name)
        return ray.train.Checkpoint(str(target), filesystem=run.storage_filesystem)

    with _checkpoint_staging(run.experiment_fs_path if local else None) as staging:
        write(staging)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
            checkpoint_dir_name=name,
            checkpoint_upload_fn=rename_into_storage if local else None,
        )


@contextlib.contextmanager
def _checkpoint_staging(run_dir: str | None) -> Iterator[Path]:
    """An empty folder to write this worker's share of a checkpoint in, removed afterwards.

    In ``run_dir`` it is ``.sdray-checkpoint-rank{R}``: one per rank, so a worker killed while writing leaves at
    most one, which the rank's next checkpoint clears. Without ``run_dir``: a temporary directory.
    """
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="sdray-checkpoint-") as tmp:
            yield Path(tmp)
        return
    import ray.train

    staging = Path(run_dir) / f".sdray-checkpoint-rank{ray.train.get_context().get_world_rank()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a worker of an earlier attempt killed while writing
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def local_copy(uri: str) -> str:
    """A local directory holding the files of ``uri``: the path itself if local, else a downloaded copy.

    Remote directories (a model on s3://) are downloaded once per content version into
    ``$SDRAY_CACHE_DIR`` (default: ``<tmp>/sdray-cache``), keyed by the URI and its file listing (names,
    sizes, modification times), so re-exporting to the same URI is picked up; the copy appears atomically.
    """
    if not is_remote(uri):
        return uri
    fs, path = resolve(uri)
    files = [(i.path, i.size, i.mtime_ns) for i in _files(fs, path, recursive=True)]
    if not files:
        return uri  # nothing there: let the caller report the missing directory under its own name
    key = hashlib.sha1(repr((uri, files)).encode()).hexdigest()[:20]
    root = os.environ.get("SDRAY_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "sdray-cache")
    local = os.path.join(root, key)
    if not os.path.isdir(local):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-")
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, local)
        except OSError:  # another process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where a Ray Train ``checkpoint`` lives, as a user would write it (``s3://bucket/...`` or a local path)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


@contextlib.contextmanager
def checkpoint_files(checkpoint: Checkpoint) -> Iterator[Path]:
    """A local directory with ``checkpoint``'s files that no other process writes to while it is open.

    A checkpoint on a local disk is read in place. A remote one is downloaded into a temporary directory of
    this caller's own, removed on exit. Ray's ``Checkpoint.as_directory()`` shares one download directory
    among the processes of a node, and a process that arrives after another has finished downloading
    downloads again into it, rewriting files the first one is still reading: two workers of one node
    resuming from s3:// then saw a truncated ``training_state.pt``.
    """
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="sdray-checkpoint-") as tmp:
        pafs.copy_files(
            checkpoint.path,
            tmp,
            source_filesystem=checkpoint.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        yield Path(tmp)
