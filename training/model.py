"""The language model: a transformers causal LM built from the recipe, wrapped for Composer.

GPT-2 (learned positions, pre-LN) or GPT-NeoX/Pythia (rotary, parallel residual) at the sizes the
recipe gives. fp32 on the CPU; the recipe's precision on a GPU (see `training.device`).
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from schemas.recipe import ModelConfig


def build_causal_lm(cfg: ModelConfig, vocab_size: int, eos_id: int, seed: int) -> torch.nn.Module:
    """A freshly initialised causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if cfg.name == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                            n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=cfg.dropout,
                            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        model = GPT2LMHeadModel(config)
    else:
        config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=cfg.d_model,
                               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                               intermediate_size=4 * cfg.d_model, max_position_embeddings=cfg.max_seq_len,
                               hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
                               bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        model = GPTNeoXForCausalLM(config)
    # Eager attention: identical maths on CPU and CUDA, and torch.func can transform it.
    model.config._attn_implementation = "eager"
    return model


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


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
