"""The options of each curation method (`stages.options` in a recipe), one keyword-only dataclass
per method, and `METHOD_OPTIONS`, the name -> class registry that the recipe validates against
(kept in step with `curation.methods.REGISTRY`; a test checks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from schemas.errors import MatesError


@dataclass(kw_only=True)
class RandomOptions:
    temperature: float = 0.5          # unused by random (pred = 0), kept so the path is shared


@dataclass(kw_only=True)
class MatesOptions:
    temperature: float = 0.5          # Gumbel-top-k temperature tau (authors: 0.5)
    # forward: the preconditioned influence by a directional derivative, no per-sample gradient
    # (curation/oracle/forward.py); the others take per-sample gradients (curation/oracle/probes.py)
    probe_method: Literal["exact", "first_order", "preconditioned", "forward"] = "exact"
    n_probes: int = 256
    probe_batch: int = 16
    reference_batch: int = 1          # forward: target rows per backward of grad L_ref (its memory: one
                                      # row at seq 512 is ~0.7 GB of activations at 124M, fp32)
    forward_derivative: Literal["auto", "central", "jvp"] = "auto"  # auto: central in fp32, jvp otherwise
    target: Optional[str] = None      # a target set of the pool (default: its full-sequence one)
    max_target: int = 64              # target examples L_ref is measured on (first N)
    encoder_max_len: int = 128
    encoder_layers: int = 6
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 16
    warm_start: bool = True
    freeze_word_embeddings: bool = True  # keep MiniLM's 30522x384 token table fixed (see fit)
    # finetune: the papers' (encoder fine-tuned, pool re-encoded at every boundary); frozen: a
    # linear head on the pool's stored embeddings (curation/influence/embeddings.py, frozen_head.py);
    # oracle: no influence model, the oracle itself scores every candidate (`n_probes` is ignored):
    # the upper bound of what a model could give, at the cost of probing the whole candidate pool;
    # ngram: the frozen head over hashed word 1-2-gram features (no transformer: the cheapest model)
    backbone: Literal["finetune", "frozen", "oracle", "ngram"] = "finetune"
    ngram_features: int = 4096        # ngram: hashed buckets (the head has this many weights)
    head_epochs: int = 100            # frozen: epochs of the linear head (cheap: no encoder pass)
    head_lr: float = 1e-3             # frozen: AdamW lr of the linear head
    head_batch_size: int = 64         # frozen: examples per head step
    embedding_dtype: Literal["float32", "float16"] = "float32"  # frozen: stored embedding floats
    # frozen: the embedding store's folder (null: <data>/embeddings/<settings>, shared by every run
    # over the pool, so a sample is embedded once and only the run that embeds it pays in the
    # ledger; `mates compare` gives each frozen run its own, so each pays for its candidates)
    embeddings_url: Optional[str] = None


@dataclass(kw_only=True)
class GroupMatesOptions(MatesOptions):
    n_trajectories: int = 32          # oracle trajectories of sequential one-step updates
    trajectory_length: int = 10       # T (authors: 10)
    # trajectories advanced together (each holds theta, m, v and a gradient): null = 1 on CUDA
    # (a large model: one trajectory's state at a time), 16 on the CPU (small models, batched)
    trajectory_batch: Optional[int] = None
    # target examples of the per-step reference loss (null: all `max_target`): evaluated T times
    # per trajectory, it is most of a trajectory's time (README, "Group oracle cost")
    trajectory_reference: Optional[int] = None
    # the relational model needs an encoder embedding of every candidate: no `oracle` or `ngram`
    backbone: Literal["finetune", "frozen"] = "finetune"
    relational_epochs: int = 200
    relational_lr: float = 1e-2
    # spherical k-means clusters over h(x): candidates / cluster_size (the greedy costs
    # ~N x cluster_size, linear in N), unless n_clusters is given (it wins)
    cluster_size: int = 2000
    n_clusters: Optional[int] = None
    quota_mode: Literal["size", "influence"] = "influence"
    quota_temperature: float = 0.5    # quota_mode=influence: size x softmax(-mean z(pred) / T); tau of MATES
    # false: the greedy drops the relational term (theta = alpha s: each cluster's quota of least s),
    # the same run without the interactions, to measure what they add (`group_mates...-no-interaction`)
    interaction: bool = True
    dedup: bool = True                # drop exact duplicates (catalog text_sha1) before selection


@dataclass(kw_only=True)
class PerplexityOptions:
    temperature: float = 0.1          # on z-scored losses: nearly a plain top-k
    band: Literal["middle", "low", "high"] = "middle"  # which losses to keep (middle: Marion et al. 2023)
    batch_size: int = 32


@dataclass(kw_only=True)
class DsirOptions:
    temperature: float = 1.0          # DSIR: Gumbel top-k on the log importance weights, tau = 1
    target: Optional[str] = None      # the target distribution: the same sets MATES' oracle uses
    max_target: int = 64
    n_features: int = 10000           # hashed n-gram buckets (DSIR: 10,000)
    max_n: int = 2                    # unigrams + bigrams


@dataclass(kw_only=True)
class ClassifierOptions:
    temperature: float = 0.1          # on z-scored logits: nearly DCLM's threshold
    target: Optional[str] = None      # positives: the same sets MATES' oracle uses
    max_target: int = 64
    n_features: int = 1 << 18
    max_n: int = 2
    dim: int = 16
    epochs: int = 5
    lr: float = 0.05


METHOD_OPTIONS: dict[str, type] = {"random": RandomOptions, "mates": MatesOptions,
                                   "group_mates": GroupMatesOptions, "perplexity": PerplexityOptions,
                                   "dsir": DsirOptions, "classifier": ClassifierOptions}


def _require(cond: bool, key: str, constraint: str, value) -> None:
    if not cond:
        raise MatesError(f"`{key}` must be {constraint}; got {value!r}.")


def check_options(opts, where: str) -> None:
    """The value checks of a method's options (types are the recipe's); `where` is their dotted key."""
    _require(opts.temperature > 0, f"{where}.temperature", "> 0", opts.temperature)
    if hasattr(opts, "n_probes"):
        _require(opts.n_probes >= 1, f"{where}.n_probes", ">= 1", opts.n_probes)
        _require(opts.probe_batch >= 1, f"{where}.probe_batch", ">= 1", opts.probe_batch)
        _require(opts.reference_batch >= 1, f"{where}.reference_batch", ">= 1", opts.reference_batch)
        _require(1 <= opts.encoder_layers <= 6, f"{where}.encoder_layers", "in [1, 6]",
                 opts.encoder_layers)
        _require(2 <= opts.encoder_max_len <= 512, f"{where}.encoder_max_len", "in [2, 512]",
                 opts.encoder_max_len)
        _require(opts.head_epochs >= 1, f"{where}.head_epochs", ">= 1", opts.head_epochs)
        _require(opts.head_lr > 0, f"{where}.head_lr", "> 0", opts.head_lr)
        _require(opts.head_batch_size >= 1, f"{where}.head_batch_size", ">= 1", opts.head_batch_size)
    for key in ("n_features", "max_n", "dim", "epochs", "batch_size", "max_target", "ngram_features"):
        if hasattr(opts, key):
            _require(getattr(opts, key) >= 1, f"{where}.{key}", ">= 1", getattr(opts, key))
    if hasattr(opts, "n_clusters"):
        for key in ("trajectory_length", "cluster_size", "relational_epochs"):
            _require(getattr(opts, key) >= 1, f"{where}.{key}", ">= 1", getattr(opts, key))
        _require(opts.trajectory_batch is None or opts.trajectory_batch >= 1, f"{where}.trajectory_batch",
                 ">= 1 or null (1 on CUDA, 16 on the CPU)", opts.trajectory_batch)
        _require(opts.trajectory_reference is None or opts.trajectory_reference >= 1,
                 f"{where}.trajectory_reference", ">= 1 or null (every `max_target` example)",
                 opts.trajectory_reference)
        _require(opts.n_clusters is None or opts.n_clusters >= 1, f"{where}.n_clusters",
                 f">= 1, or null for candidates / {where}.cluster_size", opts.n_clusters)
        _require(opts.n_trajectories >= 10, f"{where}.n_trajectories",
                 ">= 10 (a 90/10 split needs one held-out trajectory)", opts.n_trajectories)
        _require(opts.quota_temperature > 0, f"{where}.quota_temperature", "> 0",
                 opts.quota_temperature)
