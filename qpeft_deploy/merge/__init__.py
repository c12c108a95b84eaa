"""Merge adapters into base checkpoints on disk and take them out again (streamed, sharded, atomic)."""
