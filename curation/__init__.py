"""The method: corpus building and ingest, probing, influence models, scoring, selection and
stage-index writing. Pure functions and small classes over tensors, tables and URLs; no CLI code,
and nothing from `training` (data flows jobs -> training/curation -> schemas)."""
