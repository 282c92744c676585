"""The recipe: YAML -> typed, validated config, before any expensive work starts.

A recipe follows llm-foundry's train YAML (`variables`, `model`, `tokenizer`, `train_loader`,
`optimizer`, `scheduler`, `eval`, `callbacks`, `loggers`, `save_folder`, `seed`) plus a `stages:`
block and the `data:` / `run:` root URLs. `${name}` in any string is replaced by
`variables.name` (or by a top-level scalar such as `run`).

Every section is a keyword-only dataclass; `load_recipe` rejects an unknown key, a wrong type or
a value outside its allowed set with a one-line `MatesError` naming the key's dotted path.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from schemas import bounds, training_keys
from schemas.errors import MatesError
from schemas.method_options import METHOD_OPTIONS, check_options


# ---------------------------------------------------------------- sections
@dataclass(kw_only=True)
class TokenizerConfig:
    vocab_size: int = 4096            # byte-level BPE trained at ingest
    path: Optional[str] = None        # a tokenizer.json to load instead of training one
    train_chars: int = 64_000_000     # BPE training sample: the first train_chars / n_files of each file


@dataclass(kw_only=True)
class IngestConfig:
    seq_len: int = 128                # tokens per sample (documents are cut into slices)
    min_tokens: int = 16              # slices shorter than this are dropped (tails, tiny docs)
    max_docs: Optional[int] = None    # cap on documents read (None = all)
    # bytes per MDS shard before a new one starts: 64 MiB, streaming's own default (a 4 MiB shard
    # held ~1,000 samples, so a pool of 10^8 was 10^5 objects and a GET of overhead per 4 MiB)
    shard_size_limit: int = 1 << 26
    batch_docs: int = 1000            # documents tokenized per batch
    max_doc_chars: int = 10_000_000   # a longer document is refused (a dump, not a document)


@dataclass(kw_only=True)
class ModelConfig:
    name: Literal["gpt2", "gpt_neox", "llama"] = "gpt2"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 128
    dropout: float = 0.0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"  # training and evaluation; the oracle: eager
    n_kv_heads: Optional[int] = None  # llama: grouped-query heads (None = n_heads)
    d_ff: Optional[int] = None        # MLP width (None: 4 d_model; llama: its SwiGLU 8/3 d_model)
    rope_theta: float = 10000.0       # gpt_neox and llama rotary base


@dataclass(kw_only=True)
class TrainLoaderConfig:
    batch_size: int = 16              # global: split evenly over the ranks
    num_workers: Optional[int] = None  # None: 1 on Linux (loading overlaps training), 0 elsewhere
    shuffle: bool = True
    microbatch_size: Optional[Union[int, Literal["auto"]]] = None  # per device; auto: CUDA only


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass(kw_only=True)
class SchedulerConfig:
    name: Literal["constant", "cosine_with_warmup", "linear_with_warmup"] = "cosine_with_warmup"
    t_warmup: int = 0                 # batches
    alpha_f: float = 0.1              # final lr as a fraction of the peak


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 32
    max_examples: int = 256           # examples of each eval set used (first N)
    primary: Optional[str] = None     # the set `mates compare` ranks by (default: see data/sets.py)


@dataclass(kw_only=True)
class StagesConfig:
    count: int = 2
    batches: list[int] = field(default_factory=lambda: [40, 40])  # per stage; one int = every stage
    pool_per_stage: int = 1000        # candidates per stage: a fresh, disjoint slice of the pool
    selection_ratio: float = 0.5      # fraction of the candidates kept (curated stages)
    warmup_ratio: float = 1.0         # fraction kept at stage 0, the random warm-up
    method: str = "random"
    options: dict = field(default_factory=dict)
    audit_by: str = "source"          # catalog column the stage audit groups by
    candidates: Literal["auto", "samples", "shards"] = "auto"  # curation/select/candidates.py
    cache_limit: int = 8 << 30        # bytes of remote pool shards held on local disk (LRU)


@dataclass(kw_only=True)
class Recipe:
    data: str
    run: str
    seed: int = 17
    variables: dict = field(default_factory=dict)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"
    grad_clip_norm: float = 1.0
    # seconds any collective may wait (the process group's timeout); no long phase waits on one
    dist_timeout_s: float = 600.0
    save_folder: Optional[str] = None  # default: <run>/checkpoints
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_loader: TrainLoaderConfig = field(default_factory=TrainLoaderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    callbacks: dict = field(default_factory=dict)   # name -> kwargs (training/plugins.py)
    loggers: dict = field(default_factory=dict)
    parallelism: dict = field(default_factory=dict)  # {fsdp: {...}}: Composer's parallelism_config
    compile: bool = False                            # torch.compile through Composer's compile_config
    method_options: Any = None        # filled from stages.options by validation

    @property
    def stage_batches(self) -> list[int]:
        return list(self.stages.batches)

    @property
    def total_batches(self) -> int:
        return sum(self.stages.batches)

    @property
    def checkpoint_url(self) -> str:
        return self.save_folder or self.run.rstrip("/") + "/checkpoints"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("method_options")
        return out


# ---------------------------------------------------------------- generic typed build
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except MatesError:
                continue
        raise MatesError(f"`{key}` must be {_type_name(tp)}; got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise MatesError(f"`{key}` must be {_type_name(tp)}; got {value!r}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise MatesError(f"`{key}` must be {_type_name(tp)}; got {value!r}.")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise MatesError(f"`{key}` must be null; got {value!r}.")
        return None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 1e-3 as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool, dict) and isinstance(value, tp):
        return value
    if tp is Any:
        return value
    raise MatesError(f"`{key}` must be {_type_name(tp)}; got {value!r}.")


def build(cls, data, prefix: str = ""):
    """Build the dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MatesError(f"`{where}` must be a mapping; got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise MatesError(f"`{key}` is not a recipe key; allowed keys here: {', '.join(sorted(fields))}.")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise MatesError(f"`{key}` is required.")
    return cls(**kwargs)


# ---------------------------------------------------------------- semantic checks
def _require(cond: bool, key: str, constraint: str, value) -> None:
    if not cond:
        raise MatesError(f"`{key}` must be {constraint}; got {value!r}.")


def _method_options(st: StagesConfig):
    """`stages.options` is either the chosen method's options, or one block per method name
    (`{mates: {...}, group_mates: {...}}`), so one recipe runs every method (`--set
    stages.method=...`); every block is validated either way."""
    blocks = st.options
    if blocks and all(k in METHOD_OPTIONS for k in blocks):
        for name, block in blocks.items():
            build(METHOD_OPTIONS[name], block, f"stages.options.{name}")
        return build(METHOD_OPTIONS[st.method], blocks.get(st.method), f"stages.options.{st.method}")
    return build(METHOD_OPTIONS[st.method], blocks, "stages.options")


def method_options_key(st: StagesConfig) -> str:
    """The dotted key the user wrote the chosen method's options under (for error messages)."""
    per_method = bool(st.options) and all(k in METHOD_OPTIONS for k in st.options)
    return f"stages.options.{st.method}" if per_method else "stages.options"
def options_for(st: StagesConfig, method: str):
    """The validated options block of `method` in `st` (e.g. mates' encoder settings in a recipe
    whose `stages.method` is another method)."""
    return _method_options(dataclasses.replace(st, method=method))


def _validate(recipe: Recipe) -> Recipe:
    st, m = recipe.stages, recipe.model
    _require(st.count >= 1, "stages.count", ">= 1", st.count)
    if len(st.batches) == 1 and st.count > 1:
        st.batches = st.batches * st.count
    _require(len(st.batches) == st.count, "stages.batches", f"one int or a list of {st.count} ints",
             st.batches)
    for i, b in enumerate(st.batches):
        _require(b >= 1, f"stages.batches[{i}]", ">= 1", b)
    _require(0 < st.selection_ratio <= 1, "stages.selection_ratio", "in (0, 1]", st.selection_ratio)
    _require(0 < st.warmup_ratio <= 1, "stages.warmup_ratio", "in (0, 1]", st.warmup_ratio)
    _require(st.pool_per_stage >= 1, "stages.pool_per_stage", ">= 1", st.pool_per_stage)
    _require(st.cache_limit >= 0, "stages.cache_limit", ">= 0 bytes (0: only the shard being read)",
             st.cache_limit)
    if st.method not in METHOD_OPTIONS:
        raise MatesError(f"`stages.method` must be one of {', '.join(sorted(METHOD_OPTIONS))}; "
                         f"got {st.method!r}.")
    recipe.method_options = _method_options(st)
    check_options(recipe.method_options, method_options_key(st))
    _require(m.d_model % m.n_heads == 0, "model.n_heads", f"a divisor of model.d_model={m.d_model}",
             m.n_heads)
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        _require(getattr(m, key) >= 1, f"model.{key}", ">= 1", getattr(m, key))
    _require(recipe.ingest.seq_len >= 2, "ingest.seq_len", ">= 2", recipe.ingest.seq_len)
    _require(recipe.ingest.seq_len <= m.max_seq_len, "ingest.seq_len",
             f"<= model.max_seq_len={m.max_seq_len} (the model's context)", recipe.ingest.seq_len)
    _require(1 << 16 <= recipe.ingest.shard_size_limit <= 1 << 31, "ingest.shard_size_limit",
             "in [65536, 2147483648] bytes (default 67108864 = 64 MiB)", recipe.ingest.shard_size_limit)
    _require(1 <= recipe.ingest.min_tokens <= recipe.ingest.seq_len, "ingest.min_tokens",
             f"in [1, ingest.seq_len={recipe.ingest.seq_len}]", recipe.ingest.min_tokens)
    _require(256 < recipe.tokenizer.vocab_size <= training_keys.MAX_VOCAB, "tokenizer.vocab_size",
             f"in (256, {training_keys.MAX_VOCAB}]", recipe.tokenizer.vocab_size)
    _require(recipe.eval.max_examples >= 1, "eval.max_examples", ">= 1", recipe.eval.max_examples)
    _require(recipe.train_loader.batch_size >= 1, "train_loader.batch_size", ">= 1",
             recipe.train_loader.batch_size)
    _require(recipe.optimizer.lr > 0 and math.isfinite(recipe.optimizer.lr), "optimizer.lr",
             "a positive number", recipe.optimizer.lr)
    _require(len(recipe.optimizer.betas) == 2 and all(0 <= b < 1 for b in recipe.optimizer.betas),
             "optimizer.betas", "two numbers in [0, 1)", recipe.optimizer.betas)
    _require(recipe.dist_timeout_s > 0, "dist_timeout_s", "> 0 (seconds)", recipe.dist_timeout_s)
    _require(recipe.grad_clip_norm >= 0, "grad_clip_norm", ">= 0 (0 turns clipping off)",
             recipe.grad_clip_norm)
    training_keys.check(recipe)
    return recipe


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def _interpolate(node, variables: dict):
    if isinstance(node, str):
        def sub(match):
            name = match.group(1).removeprefix("variables.")
            if name not in variables:
                raise MatesError(f"`${{{match.group(1)}}}` names no variable; defined: "
                                 f"{', '.join(sorted(variables)) or 'none'}.")
            return str(variables[name])
        full = _VAR.fullmatch(node)
        if full:  # a whole-string reference keeps the variable's type
            name = full.group(1).removeprefix("variables.")
            if name in variables:
                return variables[name]
        return _VAR.sub(sub, node)
    if isinstance(node, list):
        return [_interpolate(v, variables) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate(v, variables) for k, v in node.items()}
    return node


def recipe_from_dict(raw: dict, overrides: Optional[dict] = None) -> Recipe:
    """Validate a parsed recipe (plus dotted-key overrides such as {'run': 's3://b/r'})."""
    if not isinstance(raw, dict):
        raise MatesError(f"`recipe` must be a YAML mapping; got {type(raw).__name__}.")
    raw = dict(raw)
    bounds.check_keys(raw, "recipe")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `--set run.x=1`: `run` is a value, not a section
                where = ".".join(parents[:i + 1])
                raise MatesError(f"`--set {dotted}`: `{where}` is {type(node).__name__} {str(node)[:40]!r}, "
                                 f"not a section; set `{where}` itself.")
        node[last] = value
    variables = dict(raw.get("variables") or {})
    for key in ("data", "run"):
        if isinstance(raw.get(key), str):
            variables.setdefault(key, raw[key])
    raw = _interpolate(raw, variables)
    recipe = _validate(build(Recipe, raw))
    for key in ("data", "run"):  # before anything is written under them
        bounds.check_url(getattr(recipe, key), key)
    return recipe


def load_recipe(path_or_text: str, overrides: Optional[dict] = None) -> Recipe:
    """Load a recipe from a YAML file path (or YAML text) and validate it whole.

    The file's size is checked before it is read, and YAML is parsed within the node and depth
    bounds of schemas/bounds.py: a hostile recipe costs a second, not gigabytes."""
    import os

    text, where = path_or_text, "recipe"
    if "\n" not in path_or_text:
        if not os.path.exists(path_or_text):
            raise MatesError(f"`recipe` file {path_or_text[:200]!r} does not exist.")
        where = path_or_text
        size = os.path.getsize(path_or_text)
        if size > bounds.MAX_RECIPE_BYTES:
            raise MatesError(f"`{where}` is {size:,} bytes; the bound for a recipe is "
                             f"{bounds.MAX_RECIPE_BYTES:,} bytes.")
        with open(path_or_text, "rb") as handle:
            text = handle.read()
    return recipe_from_dict(bounds.load_yaml(text, where), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
