"""The Composer side of the model: the LM of curation/lm/model.py wrapped as a ComposerModel."""
from __future__ import annotations

import torch

from curation.lm.model import build_causal_lm, n_params  # noqa: F401  (re-exported for training code)


def composer_model(lm: torch.nn.Module):
    """Wrap a transformers LM for Composer; the loss is the LM's own (labels -100 ignored).

    A 15-line ComposerModel instead of Composer's `HuggingFaceModel`, whose constructor imports
    every causal-LM class in transformers (~10 s per stage, and it starts torch.compile workers).
    """
    from composer.models import ComposerModel

    class ComposerCausalLM(ComposerModel):
        def __init__(self, lm: torch.nn.Module):
            super().__init__()
            self.lm = lm

        def forward(self, batch: dict):
            return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"])

        def loss(self, outputs, batch: dict) -> torch.Tensor:
            return outputs.loss

    return ComposerCausalLM(lm)
