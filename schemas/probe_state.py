"""The probe state: what curation needs of the model at a stage boundary, as plain tensors.

Written by the stage loop next to each Composer checkpoint as
`<run>/checkpoints/stage-<k>-probe.pt`, read by the oracle (curation/oracle/probes.py). It holds only
tensors, numbers and strings, so it loads with `torch.load(..., weights_only=True)`:

    {"format": "mates-probe-state", "version": 1, "stage": k,
     "model_type": "gpt2" | "gpt_neox", "model_config": {... transformers config dict ...},
     "model": {param_name: tensor},                       # model.state_dict()
     "exp_avg": {param_name: tensor}, "exp_avg_sq": {param_name: tensor},
     "step": {param_name: float},                         # AdamW's step count per parameter
     "hparams": {"lr": float,                             # lr at the current schedule point
                 "betas": [b1, b2], "eps": float, "weight_decay": float,
                 "grad_clip_norm": float,                 # 0 = no clipping
                 "decoupled": bool}}                      # True: Composer DecoupledAdamW

Parameter names are those of `model.named_parameters()`; tied weights appear once.
"""
from __future__ import annotations

import io

import torch

from schemas.errors import MatesError
from schemas.storage import store_for

FORMAT = "mates-probe-state"
VERSION = 1


def save_probe_state(state: dict, url: str, *parts: str) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store_for(url).write_bytes(buffer.getvalue(), *parts)


def load_probe_state(url: str, *parts: str, map_location="cpu") -> dict:
    where = "/".join([url.rstrip("/"), *parts])
    data = store_for(url).read_bytes(*parts)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        # States are written atomically, so an unreadable one was damaged from outside (a
        # truncated copy, a deleted-and-recreated store): say how to recover, not just what broke.
        raise MatesError(f"`{where}` is not a probe state checkpoint: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}; remove it and rerun (the stage that wrote "
                         f"it is trained again, to the same state).") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MatesError(f"`{where}` is not a {FORMAT} file.")
    if state.get("version") != VERSION:
        raise MatesError(f"`{where}` has version {state.get('version')}; this mates reads {VERSION}.")
    return state
