"""Paths as strings: local directories and object-store URIs (s3://, gs://) through pyarrow file systems.

The training library never assumes a local path; every file it writes outside a checkpoint goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from sdray.errors import InputError

if TYPE_CHECKING:
    from ray.train import Checkpoint


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI such as ``s3://bucket/run``."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """``uri`` unchanged if it is a URI, else the absolute local path (Ray Train needs one)."""
    return uri if "://" in uri else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri``: on a local disk via a temp file renamed into place; object stores are atomic."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    is_local = isinstance(fs, pafs.LocalFileSystem)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}" if is_local else path
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    if is_local:
        fs.move(tmp, path)
    return uri


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


def upload_dir(local_dir: str, uri: str) -> str:
    """Copy a local directory to ``uri`` (replacing what is there); local targets are renamed into place."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        import shutil

        from sdray.io import atomic_dir

        with atomic_dir(path, overwrite=True) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return uri
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)
    return uri


def local_copy(uri: str) -> str:
    """A local directory holding the files of ``uri``: the path itself if local, else a downloaded copy.

    Remote directories (a model on s3://) are downloaded once per content version into
    ``$SDRAY_CACHE_DIR`` (default: ``<tmp>/sdray-cache``), keyed by the URI and its file listing (names,
    sizes, modification times), so re-exporting to the same URI is picked up; the copy appears atomically.
    """
    if "://" not in uri:
        return uri
    import hashlib

    fs, path = resolve(uri)
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((i.path, i.size, i.mtime_ns) for i in listing if i.type == pafs.FileType.File)
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
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return local


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where ``checkpoint`` lives, as a user would write it (``s3://bucket/...`` or a local path)."""
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
