"""Tools over adapter directories (loraforge's or PEFT's on-disk format) and models.

- ``estimate``: trainable parameters and memory of a run, before training.
- ``inspect``: per-module norms, singular values and effective rank of dW = scaling·B·A.
- ``resize``: best rank-R (or energy-chosen) approximation of each dW, saved as a smaller adapter.
- ``combine``: several adapters into one (cat, svd, TIES, DARE).
- ``merge``: base + adapter as one standalone model.
- ``sweep``: train several target/rank configurations on the same data and compare them.

The math lives in ``core.lowrank`` (factored norms and SVDs, never a dense out x in matrix unless
a method needs one); ``factors`` is the per-module view of an adapter file the tools share.
"""
