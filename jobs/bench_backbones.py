"""`mates bench backbones --run RUN --stage K`: both influence-model backbones fitted on the very
same probes (a committed stage's probes.parquet, the same 90/10 split for the same seed), with
their held-out Spearman and seconds. The finetuned model is fitted from the pretrained MiniLM
(no warm start from an earlier stage), so stage 1 matches what a run fits and later stages are
the cold-start figure.

Two figures say how far to trust those held-out numbers: `frozen.cv_spearman`, the frozen head's
5-fold Spearman on probes that neither fitted it nor picked its epoch (the held-out figure is the
best of `head_epochs` epochs on the very split it is scored on), and, on a run with an influence
model at the stage before, `previous_model_spearman`: that model, unchanged, on this stage's
probes (where a warm start begins; how much the oracle's preferences moved between boundaries)."""
from __future__ import annotations

import time

import numpy as np

from schemas.errors import MatesError


def bench_backbones(run_url: str, stage: int, *, log=print) -> dict:
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.influence.embeddings import EmbeddingSettings, EmbeddingStore
    from curation.influence.frozen_head import cross_validated_spearman, fit_frozen_head
    from curation.influence.fitting import spearman
    from curation.store.stage_index import stage_committed, stage_url
    from curation.influence.finetuned import CONFIG_NAME, InfluenceModel, fit_influence_model
    from curation.store.pool import MDSFolder
    from curation.influence.scoring import pool_texts
    from schemas.recipe import load_recipe
    from schemas.storage import join, read_parquet, store_for

    recipe = load_recipe(store_for(run_url).read_bytes("recipe.yaml").decode(), {"run": run_url})
    opts = recipe.method_options
    if not hasattr(opts, "backbone"):
        raise MatesError(f"`--run` {run_url!r} is a `{recipe.stages.method}` run; it has no probes to fit on.")
    if not stage_committed(run_url, stage) or not store_for(stage_url(run_url, stage)).exists("probes.parquet"):
        raise MatesError(f"`--stage` {stage} of {run_url!r} is not committed or has no probes.parquet.")
    probes = read_parquet(stage_url(run_url, stage), "probes.parquet")
    ids = np.asarray(probes.column("sample_id"))
    labels = np.asarray(probes.column("influence"), dtype=np.float64)
    seed = recipe.seed + stage  # what the stage job seeds both fits (and so the split) with
    pool, tokenizer = MDSFolder(join(recipe.data, "pool")), load_pool_tokenizer(recipe.data)

    texts = pool_texts(pool, ids, tokenizer)
    t0 = time.perf_counter()
    _, finetune = fit_influence_model(texts, labels, options=opts, seed=seed,
                                      freeze_word_embeddings=opts.freeze_word_embeddings, log=log)
    finetune_s = time.perf_counter() - t0
    store = EmbeddingStore(recipe.data, EmbeddingSettings.from_options(opts, dtype=opts.embedding_dtype),
                           url=opts.embeddings_url)
    stats = store.ensure(ids, pool=pool, pool_tokenizer=tokenizer, batch_size=opts.batch_size * 4)
    emb = store.load(ids)
    t0 = time.perf_counter()
    _, frozen = fit_frozen_head(emb, labels, epochs=opts.head_epochs, lr=opts.head_lr,
                                batch_size=opts.head_batch_size, seed=seed, log=log)
    frozen_s = time.perf_counter() - t0
    cv = cross_validated_spearman(emb, labels, epochs=opts.head_epochs, lr=opts.head_lr,
                                  batch_size=opts.head_batch_size, seed=seed)
    previous = join(stage_url(run_url, stage - 1), "influence_model")
    carried = None
    if stage > 1 and store_for(previous).exists(CONFIG_NAME):
        carried = spearman(InfluenceModel.from_pretrained(previous).predict_texts(texts), labels)
    return {"run": run_url, "stage": stage, "probes": int(len(ids)), "probe_method": probes.column("method")[0].as_py(),
            "finetune": {"val_spearman": finetune["val_spearman"], "best_epoch": finetune["best_epoch"],
                         "epochs": finetune["epochs_run"], "seconds": finetune_s},
            "frozen": {"val_spearman": frozen["val_spearman"], "best_epoch": frozen["best_epoch"],
                       "epochs": frozen["epochs_run"], "seconds": frozen_s,
                       "embedded_first": stats["computed"], "embed_seconds": stats["seconds"], **cv},
            "previous_model_spearman": carried, "val_size": frozen["val_size"]}
