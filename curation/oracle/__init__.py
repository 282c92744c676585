"""The oracle (DESIGN.md 2.1, 2.4): what the current model says a sample is worth.

`probes` (one-step influence of a probe, exact / first-order / preconditioned), `trajectories`
(Group-MATES' sequential multi-step oracle), `audit` (per-source oracle audit of a probe state),
`stage_audit` (oracle vs prediction vs selection share per catalog group at a boundary).
May import: `curation.lm`, `curation.store`, `curation.influence`, `curation.data`,
`curation.failpoints`, `schemas`.
"""
