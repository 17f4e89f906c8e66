"""Adapter tools that work on adapter directories (loraforge's or PEFT's on-disk format).

- ``inspect``: per-module norms, singular values and effective rank of dW = scaling·B·A.
- ``resize``: best rank-R (or energy-chosen) approximation of each dW, saved as a smaller adapter.
- ``combine``: several adapters into one (cat, svd, TIES, DARE).
- ``sweep``: train several target/rank configurations on the same data and compare them.

The math lives in ``lowrank`` (factored norms and SVDs, never a dense out x in matrix unless a
method needs one) and file handling in ``adapters``. Only ``sweep`` and ``inspect --model``
load a model.
"""
