"""`mates`: model-aware selection with a learned data influence model (DESIGN.md 2.1-2.3).

At a stage boundary:
  1. probe: sample `n_probes` candidates and compute their oracle influence I(x) on the stage
     checkpoint (exact one-step AdamW update, or its first-order approximation) -> probes.parquet;
  2. fit: the MiniLM-L6 influence model on (text, I(x)), z-scored labels, 90/10 split, best epoch
     by held-out Spearman, warm-started from the previous stage's model -> influence_model/;
  3. score: predict I(x) for every candidate of the stage's pool (the shared Gumbel-top-k
     selection in `CurationMethod.select` then keeps `n_select` of them).

`backbone: frozen` replaces 2 and 3: the pool's stored encoder embeddings (curation/influence/embeddings.py;
the probed samples' and candidates' that are missing are computed and stored first, timed as
`embed`) -> a linear head fitted on the probes' (curation/influence/frozen_head.py) -> frozen_head/;
scoring is one matrix product over the candidates' stored embeddings.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from curation.lm.batching import ReferenceSet
from curation.data.sets import TARGETS, load_set
from curation.data.tokenizer import EOS, load_pool_tokenizer
from curation.failpoints import failpoint
from curation.store.stage_index import stage_url
from curation.methods import ledger
from curation.methods.base import CurationMethod, StageContext
from curation.store.pool import MDSFolder
from schemas import tables
from schemas.errors import MatesError
from schemas.probe_state import load_probe_state
from schemas.storage import join, store_for, write_parquet


def _split_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    return parent, name


class MatesMethod(CurationMethod):
    name = "mates"

    def oracle_inputs(self, ctx: StageContext, pad_id: int, limit: int | None = None) -> tuple[dict, ReferenceSet]:
        """The model state at this boundary and the target set L_ref is measured on (its loss kind
        is in its rows: `target_start` = 1 for lm, the target word's first token for cloze): its
        first `max_target` examples, or the first `limit` of those."""
        if ctx.state_url is None:
            raise MatesError(f"`{self.name}` needs a trained model state; stage 0 is always `random`.")
        state = load_probe_state(*_split_url(ctx.state_url))
        self.lm_shape = ledger.lm_shape(state)  # for the compute ledger: no second load of the state
        table = load_set(ctx.data_url, TARGETS, ctx.target)
        rows = min(ctx.options.max_target, limit or ctx.options.max_target)
        return state, ReferenceSet(table, pad_id, batch_size=16, limit=rows)

    # Probes (and Group-MATES' trajectories) are dealt to every rank of a launched run:
    # curation/stage_job.py calls `oracle_part` on each rank, rank 0 then fits on the merged parts.
    parallel_oracle = True

    def probe_ids(self, ctx: StageContext) -> np.ndarray:
        """The `n_probes` candidates probed at this boundary (sorted; the same on every rank)."""
        if self.oracle_scored(ctx):  # the oracle scores every candidate (`backbone: oracle`)
            return np.asarray(ctx.candidates)
        n = min(ctx.options.n_probes, len(ctx.candidates))
        rng = np.random.default_rng([ctx.seed, ctx.stage, 31337])
        return np.sort(rng.choice(ctx.candidates, size=n, replace=False))

    def probe_values(self, ctx: StageContext, state: dict, reference: ReferenceSet, samples: list[dict],
                     pad_id: int, length: int) -> np.ndarray:
        """I(x) of `samples` by the recipe's probe method, every chunk padded to `length`."""
        from curation.oracle.probes import probe_influence

        opts = ctx.options
        if not samples:
            return np.zeros(0)
        return probe_influence(state, reference, samples, method=opts.probe_method, probe_batch=opts.probe_batch,
                               pad_id=pad_id, device=ctx.device, reference_batch=opts.reference_batch,
                               derivative=opts.forward_derivative, length=length)

    def oracle_part(self, ctx: StageContext, rank: int, world_size: int, barrier) -> None:
        """This rank's whole chunks of the probes (curation/oracle/ranks.py); rank 0 keeps them all."""
        from curation.oracle.ranks import dealt, on_ranks

        t0 = time.perf_counter()
        ids = self.probe_ids(ctx)
        # each rank with probes builds its own prober: one reference gradient per such rank
        spans = [dealt(len(ids), ctx.options.probe_batch, r, world_size) for r in range(world_size)]
        self.probe_passes = sum(hi > lo for lo, hi in spans)

        def compute(lo: int, hi: int) -> pa.Table:  # all of it inside: a failure here is told to every rank
            pool, pad_id = MDSFolder(join(ctx.data_url, "pool")), load_pool_tokenizer(ctx.data_url).token_to_id(EOS)
            state, reference = self.oracle_inputs(ctx, pad_id)
            length = max((len(pool[int(i)]["tokens"]) for i in ids), default=1)  # one padding for all ranks
            samples = [pool[int(i)] for i in ids[lo:hi]]
            return pa.table({"sample_id": ids[lo:hi],
                             "influence": self.probe_values(ctx, state, reference, samples, pad_id, length)})

        table = on_ranks(stage_url(ctx.run_url, ctx.stage), "probes", len(ids), chunk=ctx.options.probe_batch,
                         rank=rank, world_size=world_size, barrier=barrier, compute=compute)
        if table is not None:
            self.merged_probes = (np.asarray(table.column("sample_id")), np.asarray(table.column("influence")))
        ctx.timings["probe"] = time.perf_counter() - t0
        ctx.log(f"  rank {rank}/{world_size}: probed {len(ids)} candidates' share in {ctx.timings['probe']:.1f} s")

    def probe(self, ctx: StageContext, pool: MDSFolder, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Oracle influence of `n_probes` candidates sampled at random: (sample ids, I(x)); the ranks'
        merged parts when `oracle_part` ran, else all of them here."""
        opts = ctx.options
        if getattr(self, "merged_probes", None) is not None:
            ids, influence = self.merged_probes
        else:
            state, reference = self.oracle_inputs(ctx, pad_id)
            ids = self.probe_ids(ctx)
            samples = [pool[int(i)] for i in ids]
            influence = self.probe_values(ctx, state, reference, samples, pad_id,
                                          max((len(s["tokens"]) for s in samples), default=1))
        n = len(ids)
        probes = pa.table({"sample_id": ids, "influence": influence,
                           "method": [opts.probe_method] * n, "stage": [ctx.stage] * n})
        write_parquet(tables.conform(probes, tables.PROBES), stage_url(ctx.run_url, ctx.stage), "probes.parquet")
        self.probed = (ids, influence)  # for the stage audit
        self.record_probes(ctx, pool, ids)
        return ids, influence

    def record_probes(self, ctx: StageContext, pool: MDSFolder, ids: np.ndarray) -> None:
        """flops_probe: every probe of the stage (all ranks'), and one reference pass per prober."""
        from curation.compute import probe_flops

        if getattr(self, "lm_shape", None) is None:  # a rank 0 that probed nothing: read the state
            self.lm_shape = ledger.lm_shape(load_probe_state(*_split_url(ctx.state_url)))
        probe_tokens = ledger.sample_tokens(pool, ids)
        reference_tokens = ledger.reference_tokens(ctx) * getattr(self, "probe_passes", 1)
        ledger.record(ctx, "probe", probe_flops(self.lm_shape, ctx.options.probe_method, probe_tokens=probe_tokens,
                                                reference_tokens=reference_tokens),
                      probe_tokens=probe_tokens, probe_reference_tokens=reference_tokens)
        ctx.metrics["curation/ledger/lm_forward_flops_per_token"] = self.lm_shape.forward_per_token()

    def previous_model(self, ctx: StageContext):
        """The influence model of the latest earlier stage that has one (warm start), or None."""
        from curation.influence.finetuned import InfluenceModel

        for stage in range(ctx.stage - 1, 0, -1):
            url = join(stage_url(ctx.run_url, stage), "influence_model")
            if store_for(stage_url(ctx.run_url, stage)).exists("_SUCCESS") and \
                    store_for(url).exists():
                return InfluenceModel.from_pretrained(url)
        return None

    def fit(self, ctx: StageContext, pool: MDSFolder, tokenizer, ids: np.ndarray, influence: np.ndarray):
        """The MiniLM influence model on (text, I(x)), saved under the stage; returns it."""
        from curation.influence.finetuned import fit_influence_model
        from curation.influence.scoring import pool_texts

        opts = ctx.options
        t0 = time.perf_counter()
        init = self.previous_model(ctx) if opts.warm_start else None
        model, metrics = fit_influence_model(pool_texts(pool, ids, tokenizer), influence, options=opts,
                                             seed=ctx.seed + ctx.stage, device=ctx.device, init=init,
                                             freeze_word_embeddings=opts.freeze_word_embeddings,
                                             log=lambda m: ctx.log(f"  {m}"))
        model.save_pretrained(join(stage_url(ctx.run_url, ctx.stage), "influence_model"))
        ctx.timings["fit"] = time.perf_counter() - t0
        self.record_encoder(ctx, "fit", model, fitted=metrics["fitted_tokens"], read=metrics["evaluated_tokens"])
        ctx.metrics.update({f"curation/influence/{k}": v for k, v in metrics.items()})
        ctx.log(f"  influence model: held-out Spearman {metrics['val_spearman']:.3f} "
                f"({metrics['train_size']}/{metrics['val_size']} split) in {ctx.timings['fit']:.1f} s")
        return model

    @staticmethod
    def record_encoder(ctx: StageContext, phase: str, encoder, *, fitted: int = 0, read: int = 0) -> None:
        """The MiniLM's share of a phase: `fitted` tokens trained on (all epochs), `read` forwards."""
        from curation.compute import encoder_flops

        shape = ledger.encoder_shape(encoder)
        ledger.record(ctx, phase, encoder_flops(shape, fitted_tokens=fitted, scored_tokens=read),
                      **{f"{phase}_encoder_fitted_tokens": fitted, f"{phase}_encoder_read_tokens": read})
        ctx.metrics["curation/ledger/encoder_forward_flops_per_token"] = shape.forward_per_token()

    # -- backbone: frozen ------------------------------------------------------------------
    def embedding_store(self, ctx: StageContext):
        from curation.influence.embeddings import EmbeddingSettings, EmbeddingStore

        if getattr(self, "_store", None) is None:
            settings = EmbeddingSettings.from_options(ctx.options, dtype=ctx.options.embedding_dtype)
            self._store = EmbeddingStore(ctx.data_url, settings, url=ctx.options.embeddings_url)
        return self._store

    def stored_embeddings(self, ctx: StageContext, pool: MDSFolder, tokenizer, ids: np.ndarray,
                          superset: np.ndarray | None = None) -> np.ndarray:
        """Pooled embeddings [N, D] of `ids` from the store, the missing ones computed first.

        Given `superset` (sorted, holding `ids`: the candidates), when the store already holds all
        of it and reading `ids` alone would open at least half the parts the superset does (probes
        spread over the candidates; a part is read whole), the superset is read instead, once, and
        kept for the boundary: scoring and clustering ask for the same candidates' rows and get a
        copy of them (a caller may normalise its rows in place) without a second read."""
        ids = np.asarray(ids, dtype=np.int64)
        held = getattr(self, "_held", None)
        if held is not None and len(ids) and np.all(np.isin(ids, held[0])):
            return held[1][np.searchsorted(held[0], ids)]
        store = self.embedding_store(ctx)
        if superset is not None and self._worth_reading_whole(store, ids, superset):
            self._held = (superset, self._read_stored(ctx, store, pool, tokenizer, superset))
            return self._held[1][np.searchsorted(superset, ids)]
        return self._read_stored(ctx, store, pool, tokenizer, ids)

    @staticmethod
    def _worth_reading_whole(store, ids: np.ndarray, superset: np.ndarray) -> bool:
        return (bool(np.all(np.isin(ids, superset)))
                and 2 * store.overlapping_parts(ids) >= store.overlapping_parts(superset)
                and len(store.stored_ids(superset)) == len(superset))   # nothing to embed: no rank's work moves

    def _read_stored(self, ctx: StageContext, store, pool: MDSFolder, tokenizer, ids: np.ndarray) -> np.ndarray:
        stats = store.ensure(ids, pool=pool, pool_tokenizer=tokenizer, batch_size=ctx.options.batch_size * 4,
                             device=ctx.device)
        for key in ("computed", "reused"):
            ctx.metrics[f"curation/embed/{key}"] = ctx.metrics.get(f"curation/embed/{key}", 0) + stats[key]
        ctx.timings["embed"] = ctx.timings.get("embed", 0.0) + stats["seconds"]  # new ones only
        if stats["computed"]:  # the store built its encoder to compute them
            self.record_encoder(ctx, "embed", store._encoder, read=stats["tokens"])
            ctx.log(f"  embedded {stats['computed']} new samples into {store.url} in {stats['seconds']:.1f} s")
        return store.load(ids)

    def fit_frozen(self, ctx: StageContext, pool: MDSFolder, tokenizer, ids: np.ndarray, influence: np.ndarray):
        """The linear head on the probes' stored embeddings, saved under the stage; returns it."""
        from curation.influence.frozen_head import fit_frozen_head

        opts = ctx.options
        t0 = time.perf_counter()
        embed_before = ctx.timings.get("embed", 0.0)
        emb = self.stored_embeddings(ctx, pool, tokenizer, ids, superset=np.asarray(ctx.candidates, np.int64))
        self.cross_validate(ctx, emb, influence)
        head, metrics = fit_frozen_head(emb, influence, epochs=opts.head_epochs, lr=opts.head_lr,
                                        batch_size=opts.head_batch_size, seed=ctx.seed + ctx.stage,
                                        embeddings_key=self.embedding_store(ctx).settings.key,
                                        log=lambda m: ctx.log(f"  {m}"))
        head.save(join(stage_url(ctx.run_url, ctx.stage), "frozen_head"))
        ledger.record(ctx, "fit", 0.0)  # a linear head over stored embeddings: negligible next to the LM
        # reading the stored embeddings counts as fitting; computing new ones is `embed`
        ctx.timings["fit"] = time.perf_counter() - t0 - (ctx.timings["embed"] - embed_before)
        ctx.metrics.update({f"curation/influence/{k}": v for k, v in metrics.items()})
        ctx.log(f"  frozen head: held-out Spearman {metrics['val_spearman']:.3f} "
                f"({metrics['train_size']}/{metrics['val_size']} split) in {ctx.timings['fit']:.2f} s")
        return head

    def frozen(self, ctx: StageContext) -> bool:
        return getattr(ctx.options, "backbone", "finetune") == "frozen"

    # -- backbone: ngram ---------------------------------------------------------------------
    def ngram(self, ctx: StageContext) -> bool:
        return getattr(ctx.options, "backbone", "finetune") == "ngram"

    def ngram_features(self, ctx: StageContext, pool: MDSFolder, tokenizer, ids: np.ndarray) -> np.ndarray:
        from curation.influence.hashed_ngrams import ngram_features
        from curation.influence.scoring import pool_texts

        return ngram_features(pool_texts(pool, ids, tokenizer), ctx.options.ngram_features)

    def fit_ngram(self, ctx: StageContext, pool: MDSFolder, tokenizer, ids: np.ndarray, influence: np.ndarray):
        """The frozen head's linear fit over hashed n-gram features of the probes, saved under the stage."""
        from curation.influence.frozen_head import fit_frozen_head

        opts = ctx.options
        t0 = time.perf_counter()
        features = self.ngram_features(ctx, pool, tokenizer, ids)
        self.cross_validate(ctx, features, influence)
        head, metrics = fit_frozen_head(features, influence,
                                        epochs=opts.head_epochs, lr=opts.head_lr, batch_size=opts.head_batch_size,
                                        seed=ctx.seed + ctx.stage, embeddings_key=f"ngram-{opts.ngram_features}",
                                        log=lambda m: ctx.log(f"  {m}"))
        head.save(join(stage_url(ctx.run_url, ctx.stage), "ngram_head"))
        ledger.record(ctx, "fit", 0.0)  # hashed counts and a linear head: no transformer
        ctx.timings["fit"] = time.perf_counter() - t0
        ctx.metrics.update({f"curation/influence/{k}": v for k, v in metrics.items()})
        ctx.log(f"  n-gram head: held-out Spearman {metrics['val_spearman']:.3f} "
                f"({metrics['train_size']}/{metrics['val_size']} split) in {ctx.timings['fit']:.2f} s")
        return head

    def score_slice_ngram(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        """The n-gram head over the slice, 1,024 texts at a time (features are [rows, ngram_features])."""
        from curation.influence.frozen_head import FrozenHead

        self.load_saved(ctx, FrozenHead.load, "ngram_head")
        t0 = time.perf_counter()
        pred = np.concatenate([self.model.predict(self.ngram_features(ctx, self.pool, self.tokenizer,
                                                                      sample_ids[i:i + 1024]))
                               for i in range(0, len(sample_ids), 1024)] or [np.zeros(0)])
        ledger.record(ctx, "score", 0.0)
        ctx.timings["score"] = time.perf_counter() - t0
        ctx.log(f"  scored {len(sample_ids)} candidates with the n-gram head in {ctx.timings['score']:.2f} s")
        return pred.astype(np.float64)

    def cross_validate(self, ctx: StageContext, features: np.ndarray, influence: np.ndarray) -> None:
        """The head's 5-fold cross-validated Spearman, into the marker (`cv_spearman`): the held-out
        figure of the fit picks its best epoch on the same rows, so it reads high. A linear head
        refits in seconds; too few probes (< 50) skip it."""
        from curation.influence.frozen_head import MIN_EXAMPLES, cross_validated_spearman

        if len(influence) < 5 * MIN_EXAMPLES:
            return
        opts = ctx.options
        cv = cross_validated_spearman(features, influence, epochs=opts.head_epochs, lr=opts.head_lr,
                                      batch_size=opts.head_batch_size, seed=ctx.seed + ctx.stage)
        ctx.metrics["curation/influence/cv_spearman"] = cv["cv_spearman"]
        ctx.log(f"  cross-validated Spearman {cv['cv_spearman']:.3f} ({cv['folds']} folds)")

    def oracle_scored(self, ctx: StageContext) -> bool:
        return getattr(ctx.options, "backbone", "finetune") == "oracle"

    def score_slice_oracle(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        """`backbone: oracle`: the probed influence of every candidate (probes.parquet, which rank 0
        wrote before any rank scores) is the prediction; no model is fitted."""
        from schemas.storage import read_parquet

        probes = read_parquet(stage_url(ctx.run_url, ctx.stage), "probes.parquet")
        ids, influence = np.asarray(probes.column("sample_id")), np.asarray(probes.column("influence"))
        at = np.searchsorted(ids, sample_ids)   # probe ids are the sorted candidates
        if not np.array_equal(ids[np.minimum(at, len(ids) - 1)], sample_ids):
            raise MatesError(f"`backbone: oracle`: probes.parquet of stage {ctx.stage} lacks some candidates.")
        ledger.record(ctx, "score", 0.0)  # the oracle's cost is the probing's
        return influence[at].astype(np.float64)

    def influence_model(self, ctx: StageContext):
        """Steps 1 and 2: probe, then fit. Returns (model, pool, pool tokenizer, pad id); the model
        is an `InfluenceModel` (finetune) or a `FrozenHead` (frozen)."""
        pool = MDSFolder(join(ctx.data_url, "pool"))
        tokenizer = load_pool_tokenizer(ctx.data_url)
        pad_id = tokenizer.token_to_id(EOS)
        t0 = time.perf_counter()
        ids, influence = self.probe(ctx, pool, pad_id)
        ctx.timings["probe"] = ctx.timings.get("probe", 0.0) + time.perf_counter() - t0
        failpoint("probe")
        ctx.log(f"  probed {len(ids)} candidates ({ctx.options.probe_method}): I(x) mean "
                f"{influence.mean():+.5f} std {influence.std():.5f} in {ctx.timings['probe']:.1f} s")
        ctx.metrics["curation/influence/backbone"] = ctx.options.backbone
        if self.oracle_scored(ctx):
            model = None   # the probes are the predictions (score_slice_oracle)
        elif self.ngram(ctx):
            model = self.fit_ngram(ctx, pool, tokenizer, ids, influence)
        elif self.frozen(ctx):
            model = self.fit_frozen(ctx, pool, tokenizer, ids, influence)
        else:
            model = self.fit(ctx, pool, tokenizer, ids, influence)
        failpoint("fit")
        return model, pool, tokenizer, pad_id

    parallel_scoring = True
    standardize_for_selection = True  # the influence model's outputs are shrunk (selection.py)

    def prepare(self, ctx: StageContext) -> None:
        """Probe and fit on rank 0; the model is saved under the stage for every rank to load."""
        self.model, self.pool, self.tokenizer, _ = self.influence_model(ctx)

    def load_saved(self, ctx: StageContext, load, folder: str) -> None:
        """On a rank other than 0, the model rank 0 saved under the stage (`load(url)`) and the pool."""
        if getattr(self, "model", None) is None:
            self.model = load(join(stage_url(ctx.run_url, ctx.stage), folder))
            self.pool = MDSFolder(join(ctx.data_url, "pool"))
            self.tokenizer = load_pool_tokenizer(ctx.data_url)

    def score_slice(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        """Predicted influence of `sample_ids` (this rank's slice of the candidates)."""
        from curation.influence.finetuned import InfluenceModel
        from curation.influence.scoring import score_samples

        if self.oracle_scored(ctx):
            return self.score_slice_oracle(ctx, sample_ids)
        if self.ngram(ctx):
            return self.score_slice_ngram(ctx, sample_ids)
        if self.frozen(ctx):
            return self.score_slice_frozen(ctx, sample_ids)
        self.load_saved(ctx, InfluenceModel.from_pretrained, "influence_model")
        t0 = time.perf_counter()
        counts = {}
        pred = score_samples(self.model, self.pool, sample_ids, self.tokenizer,
                             batch_size=ctx.options.batch_size * 4, device=ctx.device, counts=counts)
        ctx.timings["score"] = time.perf_counter() - t0
        self.record_encoder(ctx, "score", self.model, read=counts.get("tokens", 0))
        failpoint("score")
        ctx.log(f"  scored {len(sample_ids)} candidates in {ctx.timings['score']:.1f} s "
                f"({len(sample_ids) / max(ctx.timings['score'], 1e-9):.0f} samples/s)")
        return np.asarray(pred, dtype=np.float64)

    def score_slice_frozen(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        """The head over the slice's stored embeddings (this rank embeds its slice's missing ones)."""
        from curation.influence.frozen_head import FrozenHead

        self.load_saved(ctx, FrozenHead.load, "frozen_head")
        t0 = time.perf_counter()
        embed_before = ctx.timings.get("embed", 0.0)
        emb = self.stored_embeddings(ctx, self.pool, self.tokenizer, sample_ids)           # [N, D]
        pred = self.model.predict(emb)                                                    # [N]
        ledger.record(ctx, "score", 0.0)  # one matrix product over stored embeddings
        # reading the stored embeddings counts as scoring; computing new ones is `embed`
        ctx.timings["score"] = time.perf_counter() - t0 - (ctx.timings["embed"] - embed_before)
        failpoint("score")
        ctx.log(f"  scored {len(sample_ids)} candidates from stored embeddings in {ctx.timings['score']:.3f} s")
        return np.asarray(pred, dtype=np.float64)
