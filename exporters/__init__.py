"""Exporters from adapters to other ecosystems (ONNX, LoRA/PEFT)."""
