"""Training and evaluation of adapters and task heads with a plain torch loop."""
