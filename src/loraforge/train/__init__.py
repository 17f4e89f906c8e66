"""Supervised fine-tuning: ``config`` (TrainConfig and YAML recipes), ``loop`` (the trainer),
``checkpoint``, ``distributed`` (torch.distributed) and ``log`` (metrics.jsonl, loss.png)."""
