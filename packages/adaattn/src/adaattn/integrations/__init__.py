"""Integrations of AdaAttn with model libraries (``adaattn.integrations.transformers``)."""
