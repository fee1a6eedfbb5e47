"""Evaluation of trained models: perplexity and per-position loss, passkey retrieval, fill-mask.

Modules: perplexity (sliding windows, the per-position curve), passkey (prompts and scoring), fill_mask (BERT
top-k per mask), plots (PNG pictures), cli (`jaxctx eval`, `jaxctx eval passkey`, `jaxctx fill-mask`; no jax at
import).
"""
