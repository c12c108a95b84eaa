"""Micro-benchmarks for qpeft_deploy (run each as ``python -m benchmarks.<name>``)."""
