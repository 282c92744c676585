"""The language model side of curation: `model` builds the causal LM from a recipe's model
config; `batching` collates samples, holds a reference (target) set and computes token losses.
May import: `schemas` only (training/ builds on it, never the reverse).
"""
