"""The language model: a transformers causal LM built from the recipe's `model` section.

GPT-2 (learned positions, pre-LN), GPT-NeoX/Pythia (rotary, parallel residual) or Llama
(RMSNorm, SwiGLU, rotary, grouped-query heads) at the sizes the recipe gives. It lives in
curation/ because the oracle rebuilds the same model from a state file; training/model.py wraps
it for Composer.

Attention. Training and evaluation use `model.attn_implementation` (default `sdpa`: PyTorch's
scaled-dot-product attention, flash/memory-efficient kernels on CUDA, no [heads, L, L]
probabilities kept for the backward). The oracle rebuilds the model with eager attention
(curation/oracle/probes.py) because torch.func cannot transform SDPA in torch 2.7: `jvp` has no
forward-mode rule for the CPU flash kernel, and transformers' SDPA path does data-dependent
control flow on the mask that `vmap` refuses (checked: both raise). The maths is the same, and
tests/test_models.py holds the two to 1e-5 in fp32.
"""
from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from schemas.recipe import ModelConfig


ARCHITECTURES = {"gpt2": (GPT2Config, GPT2LMHeadModel), "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
                 "llama": (LlamaConfig, LlamaForCausalLM)}


def swiglu_width(d_model: int) -> int:
    """Llama's MLP width for `d_model`: 8/3 d_model (SwiGLU keeps 4 d_model's parameters), rounded
    up to a multiple of 64 as Llama does (768 -> 2048)."""
    return -(-8 * d_model // 3 // 64) * 64 if d_model >= 64 else -(-8 * d_model // 3 // 8) * 8


def model_config(cfg: ModelConfig, vocab_size: int, eos_id: int):
    """The transformers config of the recipe's model section."""
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if cfg.name == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                          n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff, resid_pdrop=cfg.dropout,
                          embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **ids)
    if cfg.name == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                             num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff or 4 * cfg.d_model,
                             max_position_embeddings=cfg.max_seq_len, rotary_emb_base=cfg.rope_theta,
                             hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout, **ids)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                       num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
                       intermediate_size=cfg.d_ff or swiglu_width(cfg.d_model), max_position_embeddings=cfg.max_seq_len,
                       rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout, tie_word_embeddings=True, **ids)


def build_causal_lm(cfg: ModelConfig, vocab_size: int, eos_id: int, seed: int) -> torch.nn.Module:
    """A freshly initialised causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = model_config(cfg, vocab_size, eos_id)
    model = ARCHITECTURES[cfg.name][1](config)
    set_attention(model, cfg.attn_implementation)
    # transformers finds the loss by class name; "GPT2LMHeadModel" matches none, so it warns at
    # every first loss and falls back to the causal-LM loss. Name that loss: same maths, no warning.
    model.loss_type = "ForCausalLM"
    return model


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch a built model's attention kernel (transformers dispatches on the config at forward)."""
    model.config._attn_implementation = implementation


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
