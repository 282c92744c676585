"""`group_mates`: group-level influence with a relational model and influence-aware clustering
(Group-MATES, DESIGN.md 2.4).

At a stage boundary:
  1. MATES first: one-step oracle probes and the MiniLM influence model, whose pooled,
     L2-normalised state is the embedding h(x) (`backbone: frozen`: the frozen encoder's stored
     embeddings, normalised, and the linear head fitted on them, see mates_method.py);
  2. group oracle: random trajectories of T sequential one-step updates from the stage state,
     the target-loss increment after every step -> trajectories.parquet;
  3. relational model θ_t = s_t·α·(1 − Σ_{i<t} h_i·h_t / (β(t−1))), s = w·h + b, fitted to the
     z-scored increments (head initialised from the influence model) -> relational_model/;
  4. every candidate scored: s(x) and h(x); spherical k-means over h; DuckDB drops exact
     duplicates and sets per-cluster quotas; greedy selection within each cluster with the learned
     α, β; each cluster is a bucket whose stream proportion is its quota's share. Under the
     launcher the k-means tree's top-level groups, and the greedy in their clusters, are dealt to
     the ranks (curation/methods/group_deal.py): the same labels and picks as one rank's.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from curation.data.tokenizer import EOS, load_pool_tokenizer
from curation.store.stage_index import stage_url
from curation.methods import ledger
from curation.methods.base import StageContext
from curation.methods.mates_method import MatesMethod
from curation.store import rank_files
from curation.store.pool import MDSFolder
from schemas.storage import join, write_parquet


def unit_rows(emb: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """`emb` [N, D] with each row L2-normalised, in place and in its own float type: an fp16 store's
    rows stay fp16, each chunk's norm taken in float32 (an fp16 sum of squares loses bits)."""
    for start in range(0, emb.shape[0], chunk):
        rows = emb[start:start + chunk].astype(np.float32)                                  # [c, D]
        emb[start:start + chunk] = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return emb


class GroupMatesMethod(MatesMethod):
    name = "group_mates"
    # Each rank embeds and scores its slice; rank 0 gathers the embeddings that clustering and the
    # greedy need (`save_slice`, `finish`): they are [N, D], the encoder pass is the cost.
    parallel_scoring = True
    # ... and the k-means tree's groups are dealt to the ranks for clustering and the greedy
    # (`select` on rank 0, `select_part` on the others; curation/methods/group_deal.py)
    parallel_select = True

    def trajectory_ids(self, ctx: StageContext) -> np.ndarray:
        """The random trajectories' sample ids [n, T] (the same on every rank)."""
        from curation.oracle.trajectories import random_trajectories

        opts = ctx.options
        rng = np.random.default_rng([ctx.seed, ctx.stage, 271828])
        return random_trajectories(ctx.candidates, opts.n_trajectories, opts.trajectory_length, rng)

    @staticmethod
    def trajectory_batch(ctx: StageContext) -> int:
        """Trajectories advanced together: the recipe's, else 1 on CUDA (one trajectory's theta, m, v
        and gradient at a time: what a large model allows), 16 on the CPU (small models, batched)."""
        return ctx.options.trajectory_batch or (1 if str(ctx.device).startswith("cuda") else 16)

    def trajectory_values(self, ctx: StageContext, state: dict, reference, rows: list[list[dict]], pad_id: int,
                          length: int) -> np.ndarray:
        from curation.oracle.trajectories import run_trajectories

        if not rows:
            return np.zeros((0, ctx.options.trajectory_length))
        return run_trajectories(state, reference, rows, pad_id=pad_id, device=ctx.device,
                                batch=self.trajectory_batch(ctx), length=length)

    def oracle_part(self, ctx: StageContext, rank: int, world_size: int, barrier) -> None:
        """MATES' probes, then this rank's whole chunks of the trajectories; rank 0 keeps them all."""
        from curation.oracle.ranks import on_ranks

        super().oracle_part(ctx, rank, world_size, barrier)
        t0 = time.perf_counter()
        ids = self.trajectory_ids(ctx)

        def compute(lo: int, hi: int) -> pa.Table:  # all of it inside: a failure here is told to every rank
            pool, pad_id = MDSFolder(join(ctx.data_url, "pool")), load_pool_tokenizer(ctx.data_url).token_to_id(EOS)
            state, reference = self.oracle_inputs(ctx, pad_id, limit=ctx.options.trajectory_reference)
            length = max((len(pool[int(i)]["tokens"]) for i in np.unique(ids)), default=1)  # one for all ranks
            rows = [[pool[int(i)] for i in row] for row in ids[lo:hi]]
            values = self.trajectory_values(ctx, state, reference, rows, pad_id, length)
            return pa.table({"trajectory": np.arange(lo, hi, dtype=np.int64),
                             "increments": pa.array(values.tolist(), pa.list_(pa.float64()))})

        table = on_ranks(stage_url(ctx.run_url, ctx.stage), "trajectories", len(ids),
                         chunk=self.trajectory_batch(ctx), rank=rank, world_size=world_size, barrier=barrier,
                         compute=compute)
        if table is not None:
            self.merged_trajectories = (ids, np.asarray(table.column("increments").to_pylist(), dtype=np.float64))
        ctx.timings["group_oracle"] = time.perf_counter() - t0

    def group_oracle(self, ctx: StageContext, pool: MDSFolder, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Random trajectories and their per-step oracle increments: ([n, T] ids, [n, T]); the ranks'
        merged parts when `oracle_part` ran, else all of them here."""
        from curation.oracle.trajectories import trajectories_table

        if getattr(self, "merged_trajectories", None) is not None:
            ids, increments = self.merged_trajectories
        else:
            state, reference = self.oracle_inputs(ctx, pad_id, limit=ctx.options.trajectory_reference)
            ids = self.trajectory_ids(ctx)
            rows = [[pool[int(i)] for i in row] for row in ids]
            increments = self.trajectory_values(ctx, state, reference, rows, pad_id,
                                                max((len(s["tokens"]) for r in rows for s in r), default=1))
        write_parquet(trajectories_table(ids, increments, ctx.stage), stage_url(ctx.run_url, ctx.stage),
                      "trajectories.parquet")
        self.record_trajectories(ctx, pool, ids)
        return ids, increments

    def record_trajectories(self, ctx: StageContext, pool: MDSFolder, ids: np.ndarray) -> None:
        """flops_group_oracle: every trajectory step (all ranks'), each a one-sample training step
        and a reference loss over `trajectory_reference` target rows."""
        from curation.compute import trajectory_flops

        steps = int(ids.size)                                       # trajectories x T
        tokens = ledger.sample_tokens(pool, ids)                    # the steps' batches, all together
        reference = ledger.reference_tokens(ctx, limit=ctx.options.trajectory_reference)
        # trajectory_flops takes one batch size: the mean step's tokens give the exact total
        ledger.record(ctx, "group_oracle", trajectory_flops(self.lm_shape, steps=steps,
                                                            batch_tokens=tokens / max(steps, 1),
                                                            reference_tokens=reference),
                      trajectory_steps=steps, trajectory_tokens=tokens, trajectory_reference_tokens=reference)

    def unit_embeddings(self, ctx: StageContext, model, pool: MDSFolder, tokenizer, ids: np.ndarray,
                        phase: str) -> np.ndarray:
        """h(x) [N, D] of `ids`: the L2-normalised pooled state of the frozen encoder from the store
        (frozen), or of the fitted influence model's encoder (finetune)."""
        from curation.influence.scoring import score_samples

        if self.frozen(ctx):
            return unit_rows(self.stored_embeddings(ctx, pool, tokenizer, ids))
        counts = {}
        _, emb = score_samples(model, pool, ids, tokenizer, batch_size=ctx.options.batch_size * 4,
                               device=ctx.device, with_embeddings=True, counts=counts)
        self.record_encoder(ctx, phase, model, read=counts.get("tokens", 0))  # `phase`'s encoder pass
        return np.asarray(emb)

    def prepare(self, ctx: StageContext) -> None:
        """Rank 0: probe and fit the influence model (MATES), the group oracle, and the relational
        model fitted on the trajectories' embeddings, saved under the stage for every rank."""
        from curation.influence.relational import fit_relational_model, head_from_influence_model

        opts = ctx.options
        model, pool, tokenizer, pad_id = self.influence_model(ctx)
        self.model, self.pool, self.tokenizer = model, pool, tokenizer

        t0 = time.perf_counter()
        traj_ids, increments = self.group_oracle(ctx, pool, pad_id)
        ctx.timings["group_oracle"] = ctx.timings.get("group_oracle", 0.0) + time.perf_counter() - t0
        ctx.log(f"  group oracle: {traj_ids.shape[0]} trajectories x T={traj_ids.shape[1]} in "
                f"{ctx.timings['group_oracle']:.1f} s")

        t0 = time.perf_counter()
        embed_before = ctx.timings.get("embed", 0.0)
        unique, inverse = np.unique(traj_ids, return_inverse=True)
        emb_unique = self.unit_embeddings(ctx, model, pool, tokenizer, unique, "relational_fit")
        traj_emb = np.asarray(emb_unique)[inverse.reshape(traj_ids.shape)]          # [n, T, D]
        # Both heads read the unnormalised pooled state (see head_from_influence_model).
        init_head = model.folded() if self.frozen(ctx) else head_from_influence_model(model)
        relational, metrics = fit_relational_model(
            traj_emb, increments, epochs=opts.relational_epochs, lr=opts.relational_lr,
            seed=ctx.seed + ctx.stage, init_head=init_head, device=ctx.device, log=lambda m: None)
        relational.save(join(stage_url(ctx.run_url, ctx.stage), "relational_model"))
        self.relational = relational
        ledger.record(ctx, "relational_fit", 0.0)  # a few-parameter model over embeddings (their pass is counted)
        ctx.timings["relational_fit"] = time.perf_counter() - t0 - (ctx.timings.get("embed", 0.0) - embed_before)
        ctx.metrics.update({f"curation/relational/{k}": v for k, v in metrics.items()})
        ctx.log(f"  relational model: held-out Spearman {metrics['val_spearman']:.3f}, "
                f"alpha {relational.alpha:.3f}, beta {relational.beta:.3f}")

    def load_fitted(self, ctx: StageContext) -> None:
        """On a rank other than 0: the relational model rank 0 saved, and the encoder h(x) needs
        (the fitted influence model; `frozen`: none, the store's embeddings)."""
        from curation.influence.finetuned import InfluenceModel
        from curation.influence.relational import RelationalInfluenceModel

        if getattr(self, "relational", None) is not None:
            return
        stage = stage_url(ctx.run_url, ctx.stage)
        self.relational = RelationalInfluenceModel.load(join(stage, "relational_model")).to(ctx.device)
        self.model = None if self.frozen(ctx) else InfluenceModel.from_pretrained(join(stage, "influence_model"))
        self.pool, self.tokenizer = MDSFolder(join(ctx.data_url, "pool")), load_pool_tokenizer(ctx.data_url)

    def score_slice(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        """s(x) of `sample_ids` (this rank's slice) and their h(x), kept for clustering (`finish`)."""
        self.load_fitted(ctx)
        t0 = time.perf_counter()
        embed_before = ctx.timings.get("embed", 0.0)
        emb = self.unit_embeddings(ctx, self.model, self.pool, self.tokenizer, sample_ids, "score")
        emb = torch.as_tensor(np.asarray(emb))
        # fp16 stores stay fp16 ([N, D] x 2 bytes) through clustering and the greedy; each chunk is
        # upcast at its matrix product
        self.embeddings = emb if emb.dtype == torch.float16 else emb.float()           # [n, D]
        dev = next(self.relational.parameters()).device
        with torch.no_grad():
            scores = torch.cat([self.relational.individual(chunk.to(dev, torch.float32))
                                for chunk in self.embeddings.split(1 << 16)])
        ledger.record(ctx, "score", 0.0)  # the relational head over the embeddings (their pass is counted)
        ctx.timings["score"] = time.perf_counter() - t0 - (ctx.timings.get("embed", 0.0) - embed_before)
        return scores.double().cpu().numpy()

    def save_slice(self, ctx: StageContext, rank: int) -> None:
        """The slice's h(x), exact (fp16 stays fp16), for rank 0's clustering and greedy."""
        rank_files.write_array(stage_url(ctx.run_url, ctx.stage), f"embeddings-{rank:05d}", self.embeddings.numpy())

    def finish(self, ctx: StageContext, scores: np.ndarray, world_size: int = 1) -> np.ndarray:
        """Rank 0: every candidate's h(x) in candidate order (its own slice's, then the others'),
        and the learned alpha, beta, for `select`."""
        if world_size > 1:
            url = stage_url(ctx.run_url, ctx.stage)
            others = [torch.as_tensor(rank_files.read_array(url, f"embeddings-{r:05d}")) for r in range(1, world_size)]
            self.embeddings = torch.cat([self.embeddings, *others])                    # [N, D]
        self.alpha, self.beta = self.relational.alpha, self.relational.beta
        self.world_size = world_size   # > 1: `select` deals the tree's groups to the ranks
        return scores

    def select_part(self, ctx: StageContext, rank: int, world_size: int) -> None:
        """A rank other than 0, while rank 0 selects: cluster and select within the groups dealt to it."""
        from curation.methods.group_deal import rank_part

        rank_part(stage_url(ctx.run_url, ctx.stage), rank, device=ctx.device)

    def select(self, ctx: StageContext, pred: np.ndarray) -> pa.Table:
        from curation.select import metadata
        from curation.store.catalog import catalog_files
        from curation.select.clustering import cluster_embeddings, n_clusters_for, unit_matrix
        from curation.methods.group_deal import DealtSelection
        from curation.select.greedy import select_per_cluster
        from curation.select.gumbel import standardized

        opts = ctx.options
        t0 = time.perf_counter()
        k = n_clusters_for(len(pred), opts.cluster_size, opts.n_clusters)
        world_size = getattr(self, "world_size", 1)
        # Under the launcher the tree's top-level groups are dealt to the ranks. Up to BRANCH (32)
        # clusters the tree is one group (a flat k-means) and it all runs here, as before: the deal
        # pays at large k, where the leaves' k-means and the greedy cost most.
        if world_size > 1:
            dealt = DealtSelection(stage_url(ctx.run_url, ctx.stage), world_size, device=ctx.device)
            labels = dealt.labels(unit_matrix(self.embeddings, k), self.embeddings, pred, k,
                                  seed=ctx.seed + ctx.stage)
            ctx.metrics.update({"curation/group/tree_groups": dealt.groups,
                                "curation/group/ranks_dealt": len(dealt.working())})
        else:
            labels = cluster_embeddings(self.embeddings, k, seed=ctx.seed + ctx.stage, device=ctx.device)
            labels = labels.cpu().numpy().astype(np.int32)
        ctx.timings["cluster"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.clusters = labels
        scores = pa.table({"sample_id": ctx.candidates.astype(np.int64), "prediction": pred,
                           "cluster": labels})
        catalog = catalog_files(ctx.data_url)                 # one Parquet file per pool part
        con = metadata.connect(*catalog)
        eligible = labels.copy()
        if opts.dedup:  # a duplicate's copies are dropped: label -1 is never selected
            kept = set(metadata.dedup(con, scores, catalog).column("sample_id").to_pylist())
            eligible[[sid not in kept for sid in ctx.candidates.tolist()]] = -1
            ctx.metrics["curation/group/duplicates_dropped"] = int((eligible == -1).sum())
        pool_rows = scores.filter(pa.array(eligible >= 0))
        budget = min(ctx.n_select, pool_rows.num_rows)
        # Quotas weigh clusters by their mean *standardised* prediction, so quota_temperature is in
        # units of the candidates' spread (as MATES' Gumbel tau is). On the raw outputs a model
        # fitted with MSE to noisy labels predicts with a std of ~0.2 of its labels: at T = 1 every
        # cluster got nearly its size's share and the selection stayed at the pool's mix.
        pool_rows = pool_rows.set_column(pool_rows.schema.get_field_index("prediction"), "prediction",
                                         pa.array(standardized(pool_rows.column("prediction").to_numpy())))
        quotas = metadata.cluster_quotas(con, pool_rows, budget, mode=opts.quota_mode,
                                         temperature=opts.quota_temperature)
        if world_size > 1:
            mask = dealt.mask(eligible, metadata.quotas_dict(quotas), alpha=self.alpha, beta=self.beta,
                              interaction=opts.interaction)
        else:
            mask = select_per_cluster(pred, self.embeddings, eligible, metadata.quotas_dict(quotas),
                                      alpha=self.alpha, beta=self.beta, device=ctx.device,
                                      interaction=opts.interaction)
        candidates = pa.table({"sample_id": ctx.candidates.astype(np.int64), "cluster": labels})
        table = metadata.selection_table(con, candidates, mask)
        ctx.timings["select"] = time.perf_counter() - t0
        where = f" ({dealt.groups} groups on {len(dealt.working())} ranks)" if world_size > 1 else ""
        ctx.log(f"  clustered into {k}{where} in {ctx.timings['cluster']:.1f} s, selected {int(mask.sum())} by "
                f"greedy group selection (quotas: {opts.quota_mode}"
                f"{'' if opts.interaction else ', interaction off'}) in {ctx.timings['select']:.1f} s")
        return table
