"""Arrow schema of the Group-MATES oracle trajectories table (DESIGN.md 2.4).

`<run>/stages/<k>/trajectories.parquet`: one row per step of every oracle trajectory. A trajectory
is T sequential one-step AdamW updates from the stage's probe state; `increment` is the reference
loss change that step caused, L_ref(theta_t) - L_ref(theta_{t-1}). Its sum over a trajectory's
steps is the oracle group influence of the trajectory's samples (lower is better data).

Same conventions as schemas/tables.py: name and version in the Parquet metadata, `conform` and
`check_version` from there apply unchanged.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.tables import FORMAT_VERSION, _schema

TRAJECTORIES = _schema("trajectories", [
    pa.field("trajectory", pa.int32(), nullable=False),   # 0..n_traj-1 within the stage
    pa.field("step", pa.int32(), nullable=False),         # 1..T: the paper's t (1 = first update)
    pa.field("sample_id", pa.int64(), nullable=False),    # the sample trained on at this step
    pa.field("increment", pa.float64(), nullable=False),  # L_ref(theta_t) - L_ref(theta_{t-1})
    pa.field("stage", pa.int32(), nullable=False),
])

__all__ = ["TRAJECTORIES", "FORMAT_VERSION"]
