"""The language model: a transformers causal LM built from the recipe's `model` section.

GPT-2 (learned positions, pre-LN) or GPT-NeoX/Pythia (rotary, parallel residual) at the sizes the
recipe gives. It lives in curation/ because the oracle rebuilds the same model from a state file;
training/model.py wraps it for Composer.
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from schemas.recipe import ModelConfig


ARCHITECTURES = {"gpt2": (GPT2Config, GPT2LMHeadModel), "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM)}


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
    # transformers finds the loss by class name; "GPT2LMHeadModel" matches none, so it warns at
    # every first loss and falls back to the causal-LM loss. Name that loss: same maths, no warning.
    model.loss_type = "ForCausalLM"
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
