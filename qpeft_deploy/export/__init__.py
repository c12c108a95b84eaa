"""Adapters out to other ecosystems: ONNX graphs and onnxruntime adapter files, PEFT LoRA folders (both ways)."""
