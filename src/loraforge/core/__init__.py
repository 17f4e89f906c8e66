"""The LoRA core: ``config`` (LoraConfig), ``layers`` (the math), ``ops`` (attach, targets, freeze,
named adapters, merge, mixed batches, combine), ``io`` (adapter files), ``lowrank`` (SVD of factored
updates) and ``quant`` (4-bit / 8-bit bases). Nothing here imports from the layers above."""
