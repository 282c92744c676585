"""Data influence models (DESIGN.md 2.2, 2.4): predict the oracle from text.

`finetuned` (encoder + regression head, the papers' model), `embeddings` (the frozen encoder's
embedding store, computed once per pool and shared by runs), `frozen_head` (a head on stored
embeddings), `relational` (Group-MATES' relational model), `fitting` (Spearman, best-epoch
tracking), `scoring` (score a pool slice with a finetuned model), `hashed_ngrams` (word n-gram
features shared by the DSIR and classifier baselines).
May import: `curation.store`, `curation.lm`, `curation.data`, `curation.failpoints`, `schemas`.
"""
