"""Bounded parsing of untrusted text, and the rules for names a user gives.

Every parser here has a cost bound checked while it runs, not after: a recipe's size is checked
before YAML sees it, and the YAML composer counts nodes (an alias counts as the whole subtree it
names, so "billion laughs" is refused at the alias that crosses the bound, long before anything
is expanded) and depth as it builds the node graph. A JSON record's nesting is checked before
`json.loads` recurses into it. A bound exceeded is a one-line `MatesError` naming the file, the
bound and the value seen.

Names (set names, `--set` keys, recipe keys) and URLs are checked for length and characters
before anything is written, so a refusal leaves nothing behind.
"""
from __future__ import annotations

import re

import numpy as np
import yaml

from schemas.errors import MatesError

MAX_RECIPE_BYTES = 1 << 20      # a recipe is a few KB; 1 MiB parses in about a second
MAX_YAML_NODES = 20_000         # scalars + collections, aliases counted at their full size
MAX_YAML_DEPTH = 64             # nested collections (a recipe nests four deep)
MAX_JSON_DEPTH = 64             # nested arrays/objects in one corpus or set record
MAX_LINE_BYTES = 32 << 20       # one JSONL record: 10M characters (`ingest.max_doc_chars`) at 3 bytes each
MAX_SET_BYTES = 64 << 20        # a target / eval set file, held in memory as rows
MAX_PARQUET_FOOTER_BYTES = 8 << 20   # Parquet metadata (row groups x columns), parsed whole
MAX_COLUMN_CHUNK_BYTES = 1 << 30     # one column of one row group, uncompressed
MAX_NAME_CHARS = 128            # a set name, a recipe key, a `--set` key
MAX_ID_CHARS = 4096             # a document's `id` (URLs included)
MAX_URL_CHARS = 1024            # `data`, `run`, `--input`
MAX_SET_VALUE_CHARS = 65_536    # one `--set KEY=VALUE` value

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------- YAML
class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses a document past the node or depth bound as it builds it."""

    where = "recipe"

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._count = 0
        self._weight: dict[int, int] = {}   # id(node) -> expanded node count (done nodes only)
        self._nodes: list = []              # keep composed nodes alive: ids stay unique

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._weight:
                raise MatesError(f"`{self.where}` has a recursive alias `*{event.anchor}` (line "
                                 f"{event.start_mark.line + 1}); YAML aliases must not contain themselves.")
            return super().compose_node(parent, index)
        self._depth += 1
        self._count += 1
        if self._count > MAX_YAML_NODES:  # a long flat list is refused as it is read, too
            raise MatesError(f"`{self.where}` has more than {MAX_YAML_NODES:,} YAML nodes (line "
                             f"{self.peek_event().start_mark.line + 1}); the bound is {MAX_YAML_NODES:,}.")
        if self._depth > MAX_YAML_DEPTH:
            raise MatesError(f"`{self.where}` nests deeper than {MAX_YAML_DEPTH} levels (line "
                             f"{self.peek_event().start_mark.line + 1}); the bound is {MAX_YAML_DEPTH}.")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            weight = 1
        elif isinstance(node, yaml.SequenceNode):
            weight = 1 + sum(self._weight[id(v)] for v in node.value)
        else:
            weight = 1 + sum(self._weight[id(k)] + self._weight[id(v)] for k, v in node.value)
        if weight > MAX_YAML_NODES:
            raise MatesError(f"`{self.where}` expands to more than {MAX_YAML_NODES:,} YAML nodes "
                             f"({weight:,} by line {node.end_mark.line + 1}, aliases counted at full size); "
                             f"the bound is {MAX_YAML_NODES:,}.")
        self._weight[id(node)] = weight
        self._nodes.append(node)
        return node


def load_yaml(text: str | bytes, where: str, max_bytes: int = MAX_RECIPE_BYTES):
    """Parse YAML `text` (from `where`, named in errors) within the size, node and depth bounds."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > max_bytes:
        raise MatesError(f"`{where}` is {size:,} bytes; the bound for YAML is {max_bytes:,} bytes.")
    loader = None
    try:
        loader = type("Loader", (_BoundedLoader,), {"where": where})(text)  # reads: may refuse bytes
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise MatesError(f"`{where}` is not valid YAML: {str(exc).splitlines()[0]}") from exc
    finally:
        if loader is not None:
            loader.dispose()


def check_keys(node, where: str, path: str = "") -> None:
    """Every mapping key of a parsed recipe is a short name (the tree is bounded by `load_yaml`)."""
    stack = [(node, path)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                check_name(key, f"{where} key {at + '.' if at else ''}{str(key)[:40]}", KEY)
                stack.append((child, f"{at}.{key}" if at else key))
        elif isinstance(value, list):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(value))


# ---------------------------------------------------------------- names and URLs
def check_name(name, what: str, pattern: re.Pattern = NAME, max_chars: int = MAX_NAME_CHARS) -> str:
    """`name` is a string of at most `max_chars` characters matching `pattern`."""
    if not isinstance(name, str):
        raise MatesError(f"`{what}` must be a string name; got {type(name).__name__} {str(name)[:40]!r}.")
    if len(name) > max_chars:
        raise MatesError(f"`{what}` is {len(name):,} characters; names have at most {max_chars} "
                         f"(starts {name[:40]!r}).")
    if not pattern.fullmatch(name):
        raise MatesError(f"`{what}` {name[:80]!r} must be letters, digits, '_', '.' or '-' "
                         f"(starting with a letter{', digit' if pattern is NAME else ''} or '_').")
    return name


def check_url(url, what: str, max_chars: int = MAX_URL_CHARS) -> str:
    """A local path or s3:// URL a user gave: a string, at most `max_chars`, no control characters."""
    if not isinstance(url, str) or not url:
        raise MatesError(f"`{what}` must be a local folder or s3://bucket/prefix; got {url!r}.")
    if len(url) > max_chars:
        raise MatesError(f"`{what}` is {len(url):,} characters; URLs have at most {max_chars} "
                         f"(starts {url[:40]!r}).")
    bad = _CONTROL.search(url)
    if bad:
        raise MatesError(f"`{what}` {url[:80]!r} holds the control character {bad.group()!r} "
                         f"(at {bad.start()}); URLs are printable text.")
    if url.startswith("s3://"):
        bucket = url[5:].split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise MatesError(f"`{what}` bucket {bucket[:80]!r} is not an S3 bucket name (3-63 of "
                             f"a-z, 0-9, '.', '-').")
    return url


# ---------------------------------------------------------------- JSON records
def json_depth(raw: bytes, block: int = 1 << 20) -> int:
    """The deepest nesting of arrays/objects in one JSON text (brackets inside strings skipped),
    a block at a time so a long record costs a few MB of temporaries, not eight bytes per byte."""
    stripped = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw)  # strings can hold brackets
    codes = np.frombuffer(stripped, dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(codes), block):
        c = codes[start:start + block]
        step = ((c == 91) | (c == 123)).astype(np.int64) - ((c == 93) | (c == 125))
        running = depth + np.cumsum(step)
        if running.size:
            deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def check_json_depth(raw: bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a record nested deeper than `max_depth` before `json.loads` recurses into it.

    Counting brackets is an upper bound that costs one pass in C; the exact depth is computed
    only for the rare record with more than `max_depth` of them."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    depth = json_depth(raw)
    if depth > max_depth:
        raise MatesError(f"`{where}` nests JSON {depth:,} levels deep; the bound is {max_depth}.")
