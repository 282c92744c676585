"""Readers: documents from JSONL / JSON / Parquet / text files, plain or compressed, local or `s3://`.

A document is {"id", "text", "source"}. `id` defaults to `<file>:<line>` (`<file>:<row>` for
Parquet), `<file>` being the path relative to the `--input` folder, so same-named files in two
folders never share an id; `source` defaults to the reader's `default_source`; `text` is
required. Bad input stops with a one-line error naming the file and line: a record without
`text`, text that is not valid UTF-8 (or an escaped unpaired surrogate), a truncated or corrupt
compressed file, or no documents at all.

Bounded parsing (schemas/bounds.py). A JSONL line is gathered a block at a time and refused past
`MAX_LINE_BYTES` before it is parsed; its nesting is checked before `json.loads` recurses; a
Parquet footer's length is checked before pyarrow parses it, and a column chunk's size before
it is read.

Bounded memory. Every file is opened as a stream through the store's fsspec filesystem (S3:
ranged reads with read-ahead), decompressed on the fly (`.gz`, `.zst`) and read line by line;
Parquet is read one row group at a time. No file ever sits in memory whole, except a `.txt`,
which is one document by definition (and `ingest.max_doc_chars` bounds it).

One small reader class per format, found by suffix in `READERS`; `open_stream` is the only place
that knows about compression.
"""
from __future__ import annotations

import gzip
import io
import json
import posixpath
from typing import BinaryIO, Iterator

from schemas import bounds
from schemas.errors import MatesError
from schemas.storage import store_for

COMPRESSIONS = (".gz", ".zst")
READ_BLOCK = 8 << 20  # S3 read-ahead block: few requests, bounded buffer
LINE_BLOCK = 1 << 20  # JSONL is split into lines a block at a time
PARQUET_BATCH = 256   # rows per Parquet batch: a batch of documents, not a row group


def _doc(record: dict, where: str, default_id: str, default_source: str) -> dict:
    text = record.get("text")
    if not isinstance(text, str):
        raise MatesError(f"`{where}` has no string `text` field (keys: {sorted(record)}).")
    doc_id, source = record.get("id"), record.get("source")
    doc_id = default_id if doc_id is None else str(doc_id)
    source = str(source) if source else default_source
    if len(doc_id) > bounds.MAX_ID_CHARS or len(source) > bounds.MAX_NAME_CHARS:
        key, value, bound = ("id", doc_id, bounds.MAX_ID_CHARS) if len(doc_id) > bounds.MAX_ID_CHARS \
            else ("source", source, bounds.MAX_NAME_CHARS)
        raise MatesError(f"`{where}` has an `{key}` of {len(value):,} characters; the bound is {bound:,} "
                         f"(starts {value[:40]!r}).")
    return {"id": doc_id, "text": text, "source": source}


def _check_surrogates(doc: dict, where: str) -> None:
    """JSON can spell an unpaired surrogate (`\\ud800`), which no UTF-8 writer accepts: refused here,
    naming the record, not as a traceback from the tokenizer or the catalog writer."""
    for key in ("text", "id", "source"):
        try:
            doc[key].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MatesError(f"`{where}` has an unpaired surrogate ({doc[key][exc.start]!r}) in `{key}` at "
                             f"character {exc.start:,}; it is not valid Unicode text.") from exc


def bounded_lines(stream: BinaryIO, name: str, max_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a stream, read a block at a time; a line longer than `max_bytes`
    is refused once that many bytes are buffered (a file without newlines never sits in memory).
    A line spanning blocks is gathered in one bytearray (json.loads takes it as it is): its
    bytes are held once, not once per block and again joined."""
    max_bytes = max_bytes or bounds.MAX_LINE_BYTES
    pending = bytearray()
    lineno = 0
    while True:
        block = stream.read(LINE_BLOCK)
        if not block:
            break
        lines = block.split(b"\n")
        for piece in lines[:-1]:
            lineno += 1
            if len(pending) + len(piece) > max_bytes:
                _line_too_long(name, lineno, len(pending) + len(piece), max_bytes)
            if pending:
                pending += piece
                line, pending = pending, bytearray()
                yield lineno, line
            else:
                yield lineno, piece
        pending += lines[-1]
        if len(pending) > max_bytes:
            _line_too_long(name, lineno + 1, len(pending), max_bytes)
    if pending:
        yield lineno + 1, pending


def _line_too_long(name: str, lineno: int, seen: int, max_bytes: int):
    raise MatesError(f"`{name}:{lineno}` is a line of more than {seen:,} bytes; the bound is "
                     f"{max_bytes:,} bytes per record (a record holds one document).")


def load_record(raw: bytes, where: str):
    """One JSON record, its nesting checked before `json.loads` recurses into it."""
    bounds.check_json_depth(raw, where)
    try:
        return json.loads(raw)  # bytes in: json decodes the UTF-8 itself
    except (ValueError, RecursionError) as exc:
        _bad_record(exc, where)


def _bad_record(exc: Exception, where: str):
    if isinstance(exc, UnicodeDecodeError):
        raise MatesError(f"`{where}` is not valid UTF-8 (byte {exc.start}); re-encode the file.") from exc
    if isinstance(exc, RecursionError):  # brackets in strings hid the depth from the count: still one line
        raise MatesError(f"`{where}` nests JSON deeper than Python can parse; the bound is "
                         f"{bounds.MAX_JSON_DEPTH}.") from exc
    raise MatesError(f"`{where}` is not valid JSON: {getattr(exc, 'msg', exc)}.") from exc


class JsonlReader:
    """One JSON object per line (`.jsonl`, and `.json` written the same way, as C4 / Dolma do)."""

    suffixes = (".jsonl", ".json")

    def read(self, stream: BinaryIO, name: str, default_source: str) -> Iterator[dict]:
        loads, max_depth = json.loads, bounds.MAX_JSON_DEPTH
        for lineno, raw in bounded_lines(stream, name):
            if raw.isspace() or not raw:
                continue
            where = f"{name}:{lineno}"
            if raw.count(b"[") + raw.count(b"{") > max_depth:  # two C scans; the exact depth only then
                bounds.check_json_depth(raw, where)
            try:
                record = loads(raw)  # bytes in: json decodes the UTF-8 itself
            except (ValueError, RecursionError) as exc:
                _bad_record(exc, where)
            if not isinstance(record, dict):
                raise MatesError(f"`{where}` is not a JSON object.")
            doc = _doc(record, where, where, default_source)
            if b"\\u" in raw and (b"\\ud" in raw or b"\\uD" in raw):  # only an escape makes a surrogate
                _check_surrogates(doc, where)
            yield doc


class ParquetReader:
    """A `text` column (and optional `id`, `source`), a batch of rows at a time.

    Bounded: the footer's length (the last 8 bytes) is checked before pyarrow parses it, and rows
    are read in small batches (pyarrow reads a row group's pages as the batches need them), so
    a file with one huge row group costs a batch, not the group."""

    suffixes = (".parquet",)

    def read(self, stream: BinaryIO, name: str, default_source: str) -> Iterator[dict]:
        import pyarrow.parquet as pq

        _check_footer(stream, name)
        try:
            parquet = pq.ParquetFile(stream)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
            raise MatesError(f"`{name}` is not a readable Parquet file: {exc}") from exc
        names = parquet.schema_arrow.names
        if "text" not in names:
            raise MatesError(f"`{name}` has no `text` column (columns: {names[:20]}).")
        columns = [c for c in ("text", "id", "source") if c in names]
        row = 0
        for group in range(parquet.num_row_groups):
            meta = parquet.metadata.row_group(group)
            size = max(meta.column(i).total_uncompressed_size for i in range(meta.num_columns))
            if size > bounds.MAX_COLUMN_CHUNK_BYTES:
                raise MatesError(f"`{name}` row group {group} holds a column of {size:,} bytes uncompressed; "
                                 f"the bound is {bounds.MAX_COLUMN_CHUNK_BYTES:,}. Rewrite it with smaller "
                                 f"row groups (pyarrow: `row_group_size`).")
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=columns):
                for record in batch.to_pylist():
                    yield _doc(record, f"{name}:row {row}", f"{name}:{row}", default_source)
                    row += 1


def _check_footer(stream: BinaryIO, name: str) -> None:
    size = stream.seek(0, 2)
    stream.seek(max(0, size - 8))
    tail = stream.read(8)
    stream.seek(0)
    if len(tail) < 8 or tail[4:] != b"PAR1":
        raise MatesError(f"`{name}` is not a readable Parquet file: no PAR1 footer ({size:,} bytes).")
    footer = int.from_bytes(tail[:4], "little")
    if footer > bounds.MAX_PARQUET_FOOTER_BYTES:
        raise MatesError(f"`{name}` has a Parquet footer of {footer:,} bytes; the bound is "
                         f"{bounds.MAX_PARQUET_FOOTER_BYTES:,} (too many row groups or columns).")


class TextReader:
    """A `.txt` file is one document."""

    suffixes = (".txt",)

    def read(self, stream: BinaryIO, name: str, default_source: str) -> Iterator[dict]:
        data = stream.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MatesError(f"`{name}` is not valid UTF-8 (byte {exc.start}); re-encode the file.") from exc
        yield {"id": name, "text": text, "source": default_source}


READERS = [JsonlReader(), ParquetReader(), TextReader()]
SUFFIXES = tuple(s + c for r in READERS for s in r.suffixes for c in ("",) + COMPRESSIONS
                 if not (c and s == ".parquet"))  # Parquet compresses inside the file


def reader_for(name: str):
    base = name[:-len(c)] if (c := next((c for c in COMPRESSIONS if name.endswith(c)), "")) else name
    for reader in READERS:
        if base.endswith(reader.suffixes) and not (c and isinstance(reader, ParquetReader)):
            return reader
    raise MatesError(f"`input` {name!r} must end with one of {', '.join(SUFFIXES)}.")


def open_stream(file_url: str) -> BinaryIO:
    """A buffered binary stream of the file's decompressed bytes."""
    store = store_for(file_url)
    raw = store.open_read(block_size=READ_BLOCK)
    if file_url.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 20)
    if file_url.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)
    return raw


class _ZstdStream(io.RawIOBase):
    """Decompress a zstd stream frame after frame (pzstd and others write several per file).

    zstandard's own `stream_reader` ends quietly when a file is cut mid-frame, so this reader
    drives `decompressobj` itself and calls an end of input inside a frame what it is: truncation.
    """

    CHUNK = 1 << 20

    def __init__(self, raw):
        import zstandard

        self.raw, self.zstd = raw, zstandard.ZstdDecompressor()
        self.dobj, self.pending, self.in_frame = self.zstd.decompressobj(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            data = self.raw.read(self.CHUNK)
            if not data:
                if self.in_frame:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            while data:
                self.in_frame = True
                self.pending += self.dobj.decompress(data)
                data = b""
                if self.dobj.eof:  # frame complete; what follows starts the next frame
                    data, self.in_frame = self.dobj.unused_data, False
                    self.dobj = self.zstd.decompressobj()
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_file(file_url: str, default_source: str = "text", name: str | None = None) -> Iterator[dict]:
    """Every document of one input file, in record order. `name` (default: the basename) is the
    file's path relative to the `--input` folder (`doc_name`): default ids are `<name>:<line>`,
    unique across folders holding files of the same basename."""
    name = name or posixpath.basename(file_url)
    reader = reader_for(posixpath.basename(file_url))
    stream = open_stream(file_url)
    try:
        yield from reader.read(stream, name, default_source)
    except MatesError:
        raise
    except (EOFError, OSError, ValueError) as exc:  # truncated / corrupt gzip or zstd, S3 failure
        kind = "truncated" if isinstance(exc, EOFError) else "unreadable"
        raise MatesError(f"`{file_url}` is {kind}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise MatesError(f"`{file_url}` is not a valid zstd file: {exc}") from exc
        raise
    finally:
        stream.close()


def input_files(url: str) -> list[str]:
    """The input files a path names: the file itself, or every readable file under a folder, sorted."""
    store = store_for(url)
    if store.fs.isfile(store.root):
        reader_for(posixpath.basename(store.url))  # refuses an unknown suffix
        return [store.url]
    if not store.exists():
        raise MatesError(f"`input` {url!r} does not exist.")
    files = [store.url_of(rel) for rel in store.walk_files() if rel.endswith(SUFFIXES)]
    if not files:
        raise MatesError(f"`input` {url!r} holds no {', '.join(SUFFIXES)} files.")
    return files


def doc_name(input_url: str, file_url: str) -> str:
    """A file's name in default doc ids: its path relative to the `--input` folder (the basename
    when the input is the file itself)."""
    root = store_for(input_url).url.rstrip("/") + "/"
    return file_url[len(root):] if file_url.startswith(root) else posixpath.basename(file_url)


def read_documents(url: str, default_source: str = "text") -> Iterator[dict]:
    """Every document under `url`, in file order then record order; errors if there are none."""
    count = 0
    for file_url in input_files(url):
        for doc in read_file(file_url, default_source, doc_name(url, file_url)):
            count += 1
            yield doc
    if count == 0:
        raise MatesError(f"`input` {url!r} holds no documents; give at least one record with `text`.")
