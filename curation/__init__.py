"""The method, one subpackage per part (DESIGN.md section 4):

    data/       text in: packaged sources, the demo corpus, readers, tokenizer, ingest, target/eval sets
    lm/         the language model the oracle probes: builder, batches, token losses
    store/      what lives in the object store: pool reader, stage index, run views
    oracle/     ground truth: one-step probes, trajectories (Group-MATES), the oracle and stage audits
    influence/  models that predict influence from text: finetuned encoder, embedding store and
                frozen head, relational model, pool scoring, hashed n-gram features
    select/     from scores to a selection: Gumbel-top-k, spherical k-means, the greedy, DuckDB quotas
    methods/    one file per curation method, composing the parts above
    stage_job   one boundary: run a method, write the selection and the stage index, commit
    failpoints  named fault-injection points for the kill/fault tests

Pure functions and small classes over tensors, tables and URLs; no CLI code and nothing from
`training` or `jobs`. Inside `curation/`, `methods/` and `stage_job` use the parts; the parts never
import them, and the parts import each other one way only:
data, lm, select <- store <- influence <- oracle (tests/test_layout.py checks every import).
"""
