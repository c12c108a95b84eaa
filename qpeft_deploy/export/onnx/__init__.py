"""ONNX export: merged, runtime (CircuitApply functions) and swappable graphs; onnxruntime adapter files."""
