"""What a run writes and reads back, apart from how it trains: its directory (the lock, the resume check,
archiving: directory.py), checkpoints (checkpoints.py), metrics.jsonl (metrics.py), the trackers and the console
(tracking.py), and the model card (card.py). Nothing here imports a trainer."""
