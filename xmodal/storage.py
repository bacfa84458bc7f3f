"""Run storage that may be a local or shared folder or an object-store URI (``s3://``, ``gs://``,
``abfs://``, ``file://``), reached through pyarrow filesystems exactly as Ray Train reaches its
``storage_path``.

On a cluster the driver (inside ``ray job submit``, on the head node) and the rank-0 training
worker (on any node) do not share a disk, so everything they write goes through these helpers,
never through ``open()`` on a path that only exists where it was computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from xmodal.config import ConfigError


def in_ray_job() -> bool:
    """True in the driver of ``ray job submit`` and its child processes."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor


def absolute(location: str | Path) -> str:
    """A URI unchanged; a local path made absolute (Ray resolves relative paths differently on
    every process: the job's working directory is a temporary copy)."""
    s = str(location)
    return s if "://" in s else str(Path(s).expanduser().resolve())


def durable(location: str | Path, setting: str) -> str:
    """``absolute(location)``, refusing a relative path inside ``ray job submit``: Ray runs the job
    in a temporary copy of its working directory, deleted with the job, on the head node only."""
    s = str(location)
    if "://" not in s and not Path(s).expanduser().is_absolute() and in_ray_job():
        raise ConfigError(
            f"{setting}={s} is a relative path, which inside `ray job submit` means the job's "
            f"temporary working directory (deleted after the job, and on the head node only); give "
            f"an absolute path on storage every node mounts, e.g. --set {setting}=/mnt/shared/xmodal/"
            f"{Path(s).name}, or a URI such as s3://BUCKET/xmodal/{Path(s).name}"
        )
    return absolute(s)


def join(location: str | Path, *parts: str) -> str:
    """``location``/``parts`` for paths and URIs alike (URIs always use ``/``)."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(location: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). With ``filesystem`` given, ``location`` is already a path in
    it (as Ray's ``RunConfig(storage_filesystem=...)``)."""
    if filesystem is not None:
        return filesystem, str(location)
    try:
        return pafs.FileSystem.from_uri(absolute(location))
    except (ValueError, NotImplementedError) as e:  # pyarrow's ArrowInvalid / ArrowNotImplementedError
        raise ValueError(
            f"storage location {location!r} is neither a local path nor a URI pyarrow can open "
            f"({e}); use a folder, file://, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or abfs://..."
        ) from None


def write_bytes(location: str | Path, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    fs, path = resolve(location, filesystem)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)  # object stores ignore it; real folders need it
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str | Path, text: str, filesystem: pafs.FileSystem | None = None) -> None:
    write_bytes(location, text.encode("utf-8"), filesystem)


def read_bytes(location: str | Path, filesystem: pafs.FileSystem | None = None) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, path = resolve(location, filesystem)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


class DirectoryMirror:
    """Copies a local folder to ``location`` file by file, sending only files whose size or
    modification time changed since the last ``sync`` (growing logs are re-sent whole: object
    stores have no append)."""

    def __init__(self, local: str | Path, location: str | Path, filesystem: pafs.FileSystem | None = None):
        self.local = Path(local)
        self.fs, self.path = resolve(location, filesystem)
        self._sent: dict[Path, tuple[int, int]] = {}

    def sync(self) -> int:
        """Upload what changed; returns the number of files sent."""
        sent = 0
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            st = f.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if self._sent.get(f) == stamp:
                continue
            rel = f.relative_to(self.local).as_posix()
            write_bytes(join(self.path, rel), f.read_bytes(), self.fs)
            self._sent[f] = stamp
            sent += 1
        return sent
