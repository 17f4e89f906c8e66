"""Scoring a base model or an adapter: loss, perplexity, exact match (``score``)."""
