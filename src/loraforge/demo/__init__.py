"""The demo: generated tasks with held-out splits (``tasks``) and ``loraforge demo`` (``run``)."""
