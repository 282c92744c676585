"""Object-store URLs: a local directory (the embedded default) or `s3://bucket/prefix`.

One function, `store_for(url)`, turns a URL into a `Store`: an fsspec filesystem plus a root
path. S3 endpoints and credentials come only from the standard AWS environment variables
(`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...); nothing here logs them.

Atomic writes. A table, an index or a marker is either there whole or not at all:
* local: written to a hidden temporary file in the same directory, then `os.replace`d;
* S3: one PUT (or one multipart upload) is itself the commit, since an object only becomes
  visible once its upload completes; a failed upload leaves no object behind.

Bytes read. Every read through this module is counted per path in `READS` (`bytes_read()`,
`reset_reads()`): `Store.read_bytes` (and so `read_parquet`), `Store.read_range`, `Store.get_file` (the file's size
once fetched) and the streams of `Store.open_read` (the bytes their reads return, so pyarrow's
ranged reads of the catalog count what they fetch, not the file's size). Not counted: code that
opens a local path itself (mosaicml-streaming's shard reader behind `MDSFolder` on a local pool,
DuckDB reading a local Parquet path). `mates bench scale` reads the counter per boundary.
"""
from __future__ import annotations

import io
import os
import posixpath
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import fsspec

from schemas.errors import MatesError

_S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment, or None for AWS itself."""
    for var in _S3_ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def export_endpoint_for_streaming() -> None:
    """mosaicml-streaming and Composer read `S3_ENDPOINT_URL`; mirror the AWS variable into it."""
    endpoint = s3_endpoint()
    if endpoint and not os.environ.get("S3_ENDPOINT_URL"):
        os.environ["S3_ENDPOINT_URL"] = endpoint


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/', whatever the scheme."""
    out = url.rstrip("/")
    for part in parts:
        out = out + "/" + str(part).strip("/")
    return out


# What an S3 client is made from: the endpoint and credential variables (read at each call, so a
# changed environment gets a new client). Shell out to a new process and it gets its own.
_S3_CLIENT_VARS = (*_S3_ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")
_S3_FILESYSTEMS: dict = {}


def _s3_filesystem():
    """One filesystem per process and client settings: making an S3 client costs ~0.5 s of CPU
    (botocore loads its service model), which a new one per `store_for` paid on every call."""
    key = (os.getpid(), *(os.environ.get(var) for var in _S3_CLIENT_VARS))
    fs = _S3_FILESYSTEMS.get(key)
    if fs is None:
        fs = _S3_FILESYSTEMS[key] = _new_s3_filesystem()
    return fs


def _new_s3_filesystem():
    import s3fs

    client_kwargs = {}
    endpoint = s3_endpoint()
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    # Standard retry mode retries 500/503/throttling with backoff; a short connect timeout
    # makes a store that is down fail in seconds with a clear error instead of hanging.
    config_kwargs = {"connect_timeout": 5, "read_timeout": 60,
                     "retries": {"max_attempts": 4, "mode": "standard"}}
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs,
                           skip_instance_cache=True, use_listings_cache=False)
    fs.retries = 3  # s3fs's own retry loop, around botocore's attempts above
    return fs


class ReadCounter:
    """Bytes read through this module since the last reset, per path (a module-level instance)."""

    def __init__(self):
        self._lock = threading.Lock()   # s3fs and pyarrow may read from other threads
        self.by_path: dict[str, int] = {}

    def add(self, path: str, n: int) -> None:
        if n:
            with self._lock:
                self.by_path[path] = self.by_path.get(path, 0) + int(n)

    def total(self) -> int:
        with self._lock:
            return sum(self.by_path.values())

    def reset(self) -> dict[str, int]:
        """Start again from 0; returns what was counted."""
        with self._lock:
            seen, self.by_path = self.by_path, {}
        return seen


READS = ReadCounter()


def bytes_read() -> int:
    return READS.total()


def reset_reads() -> dict[str, int]:
    return READS.reset()


class _CountedStream:
    """A read stream that adds the bytes each read returns to `READS` (everything else delegated)."""

    def __init__(self, stream, path: str):
        self._stream, self._path = stream, path

    def read(self, *args):
        data = self._stream.read(*args)
        READS.add(self._path, len(data))
        return data

    def read1(self, *args):
        data = self._stream.read1(*args)
        READS.add(self._path, len(data))
        return data

    def readinto(self, buffer):
        n = self._stream.readinto(buffer)
        READS.add(self._path, n or 0)
        return n

    def readline(self, *args):
        line = self._stream.readline(*args)
        READS.add(self._path, len(line))
        return line

    def __iter__(self):
        return iter(self.readline, b"")

    def __enter__(self):
        self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        return self._stream.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@dataclass(frozen=True)
class Store:
    """A filesystem and the root path inside it that a URL names."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        return join(self.url, *parts)

    def exists(self, *parts: str) -> bool:
        return self._call(self.fs.exists, self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        path = self.path(*parts)
        if not self._call(self.fs.exists, path):
            raise MatesError(f"`{self.url_of(*parts)}` does not exist.")
        data = self._call(self.fs.cat_file, path)
        READS.add(path, len(data))
        return data

    def open_read(self, *parts: str, block_size: int = 8 << 20):
        """A binary stream of a file (S3: ranged reads of `block_size` with read-ahead)."""
        path = self.path(*parts)
        return _CountedStream(self._call(self.fs.open, path, "rb", block_size=block_size), path)

    def read_range(self, *parts: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file: one ranged GET on S3, retried as `read_bytes` is."""
        path = self.path(*parts)
        data = self._call(self.fs.cat_file, path, start=start, end=end)
        READS.add(path, len(data))
        return data

    def size(self, *parts: str) -> int:
        return int(self._call(self.fs.size, self.path(*parts)) or 0)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write `data` atomically (see the module docstring)."""
        path = self.path(*parts)
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            self._write_local(path, lambda dst: dst.write(data), parts)
        else:
            self._call(_faulted(self.fs.pipe_file, path), path, data)

    def put_file(self, local_path: str, *parts: str) -> None:
        """Copy a local file into the store atomically."""
        path = self.path(*parts)
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            # copied in chunks, not read whole: a pool's catalog can be larger than memory allows
            with open(local_path, "rb") as src:
                self._write_local(path, lambda dst: shutil.copyfileobj(src, dst, 8 << 20), parts)
        else:
            self._call(_faulted(self.fs.put_file, path), local_path, path)

    def _write_local(self, path: str, write, parts) -> None:
        """Write through a hidden temporary file and rename it into place; a failed write (a full
        disk, an I/O error) removes the temporary file and is one line naming the file."""
        tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as dst:
                write(dst)
                write_fault(path)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise MatesError(f"`{self.url_of(*parts)}` could not be written: {exc.strerror or exc} "
                             f"(errno {exc.errno}); free space or fix the disk, then rerun.") from exc

    def get_file(self, local_path: str, *parts: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        self._call(self.fs.get_file, self.path(*parts), local_path)
        READS.add(self.path(*parts), os.path.getsize(local_path))

    def listdir(self, *parts: str) -> list[str]:
        """Basenames directly under a folder, sorted; [] when it does not exist."""
        path = self.path(*parts)
        if not self._call(self.fs.exists, path):
            return []
        entries = self._call(self.fs.ls, path, detail=False)
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def file_sizes(self, *parts: str) -> dict[str, int]:
        """{basename: bytes} of the files directly under a folder, from one listing (on S3 one
        request per 1,000 files, where a size per file would be a request each)."""
        path = self.path(*parts)
        if not self._call(self.fs.exists, path):
            return {}
        entries = self._call(self.fs.ls, path, detail=True)
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    def walk_files(self, *parts: str) -> Iterator[str]:
        """Every file under a folder, as paths relative to the store root."""
        base = self.path(*parts)
        if not self._call(self.fs.exists, base):
            return
        for path in sorted(self._call(self.fs.find, base)):
            yield posixpath.relpath(path, self.root)

    def preflight(self) -> None:
        """Fail fast, before any work, when the store is unreachable or its bucket is missing."""
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            return
        bucket = self.root.split("/", 1)[0]
        if not self._call(self.fs.exists, bucket):
            raise MatesError(f"`{self.url}`: bucket {bucket!r} does not exist (or these credentials "
                             f"cannot see it); create it first.")

    def wait_for(self, *parts: str, poll_s: float = 0.2, max_poll_s: float = 5.0, check=None) -> float:
        """Poll until `parts` exists (backing off from `poll_s` to `max_poll_s`); the seconds waited.

        How one rank waits on another's long phase (rank 0 curating a boundary, uploading a
        checkpoint): a file in the store has no clock, where a barrier times out after the
        process group's `dist_timeout_s`. A rank that dies instead is the launcher's to handle:
        `composer -n N` (and torchrun) end every rank when one exits with an error. `check`, if
        given, is called at every poll and may raise (a peer that failed: curation/store/rank_files.py)."""
        started, wait = time.monotonic(), poll_s
        while not self.exists(*parts):
            if check is not None:
                check()
            time.sleep(wait)
            wait = min(max_poll_s, wait * 1.5)
        return time.monotonic() - started

    def remove(self, *parts: str) -> None:
        """Remove a file or a folder tree; absent is fine."""
        path = self.path(*parts)
        if self._call(self.fs.exists, path):
            self._call(self.fs.rm, path, recursive=True)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MatesError:
            raise
        except FileNotFoundError as exc:
            raise MatesError(f"`{self.url}` not found: {exc}") from exc
        except PermissionError as exc:
            raise MatesError(f"`{self.url}` refused access: {exc}") from exc
        except OSError as exc:
            raise MatesError(f"`{self.url}` is unreachable: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # botocore and aiohttp errors are not OSErrors
            name = type(exc).__name__
            if any(key in name for key in ("Endpoint", "Connect", "ClientError", "NoCredentials", "Timeout")):
                raise MatesError(f"`{self.url}` is unreachable: {name}: {exc}") from exc
            raise


def write_fault(path: str) -> None:
    """A failpoint for tests (curation/failpoints.py): `MATES_WRITE_FAULT=ENOSPC:<suffix>` (or
    `EIO:<suffix>`) makes every store write of a path ending in `<suffix>` fail as a full disk (or
    an I/O error) would. Unset, it costs one dictionary lookup."""
    fault = os.environ.get("MATES_WRITE_FAULT")
    if fault:
        import errno

        name, _, suffix = fault.partition(":")
        if path.endswith(suffix):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code), path)


def _faulted(fn, path: str):
    def call(*args, **kwargs):
        write_fault(path)
        return fn(*args, **kwargs)
    return call


def store_for(url: str) -> Store:
    """The `Store` that a local path, `file://` or `s3://` URL names."""
    if not url:
        raise MatesError("`url` is empty; give a local directory or s3://bucket/prefix.")
    if len(url) > 4096 or any(ord(c) < 32 or c == "\x7f" for c in url):
        raise MatesError(f"`url` {url[:80]!r} is over 4096 characters or holds a control character; "
                         f"give a local directory or s3://bucket/prefix.")
    if url.startswith("s3://"):
        bucket_and_prefix = url[len("s3://"):].rstrip("/")
        if not bucket_and_prefix:
            raise MatesError(f"`url` {url!r} names no bucket; use s3://bucket/prefix.")
        return Store(url=url.rstrip("/"), fs=_s3_filesystem(), root=bucket_and_prefix)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise MatesError(f"`url` scheme {scheme!r} is not supported; use a local directory or s3://.")
    # A bare relative name (`corpus.jsonl`, `data`) is a path under the current folder.
    local = os.path.abspath(os.path.expanduser(url))
    return Store(url=local, fs=fsspec.filesystem("file"), root=local)


def split_url(url: str) -> tuple[str, str]:
    """(folder URL, basename) of a file's URL; a bare name's folder is the current folder."""
    resolved = store_for(url).url
    parent, _, name = resolved.rpartition("/")
    if not name or (resolved.startswith("s3://") and "/" not in resolved[len("s3://"):]):
        raise MatesError(f"`url` {url!r} names a folder or bucket, not a file.")
    return parent or "/", name


def write_parquet(table, url: str, *parts: str) -> None:
    """Write an Arrow table as one Parquet object, atomically."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    store_for(url).write_bytes(buffer.getvalue(), *parts)


def read_parquet(url: str, *parts: str):
    """Read one Parquet object into an Arrow table."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store_for(url).read_bytes(*parts)))
