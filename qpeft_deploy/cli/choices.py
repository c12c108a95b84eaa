"""Small constants the CLI needs for its options, kept here so that ``qpeft --help`` imports nothing heavy.

Each mirrors a library constant (named beside it); the library validates every value again, and
tests/test_cli_imports.py checks that the two stay equal.
"""

KEEP = "keep"  # qpeft_deploy.io.file_tools.KEEP, qpeft_deploy.merge.checkpoint.KEEP
ANGLE_BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # qpeft_deploy.core.quantize.ANGLE_BITS
LAMBDA_BITS = (2, 3, 4, 5, 6, 7, 8)  # qpeft_deploy.core.quantize.LAMBDA_BITS
HEAD_BITS = (2, 3, 4, 5, 6, 7, 8)  # qpeft_deploy.core.quantize.HEAD_BITS
DEFAULT_MAX_SHARD_SIZE = "2GB"  # qpeft_deploy.merge.checkpoint.DEFAULT_MAX_SHARD_SIZE

# qpeft_deploy.export.onnx.export: MODES, DTYPES, APPLIES, VIAS, TASKS (its keys); io.onnx_adapter: SWAPS
ONNX_MODES = ("merged", "runtime", "swappable")
ONNX_DTYPES = ("fp32", "fp16")
ONNX_QUANTIZE = ("int8", "int4")  # qpeft_deploy.export.onnx.precision.QUANTIZE
ONNX_SWAPS = ("factors", "angles")
ONNX_APPLIES = ("auto", "circuit", "dense", "fold")
ONNX_VIAS = ("torch", "optimum")
ONNX_TASKS = ("text-classification", "feature-extraction", "text-generation", "image-classification")

# qpeft_deploy.io.peft_folder.TASK_MODELS (its keys), qpeft_deploy.export.lora.export.DTYPES (its keys)
PEFT_TASK_TYPES = ("SEQ_CLS", "FEATURE_EXTRACTION", "CAUSAL_LM")
LORA_DTYPES = ("fp32", "fp16", "bf16")
