"""Quantum-PEFT as a native PEFT method (the ``[peft]`` extra): ``QpeftConfig`` for ``get_peft_model``.

Importing this package registers the method with PEFT; ``import qpeft_deploy`` does so as soon as ``peft`` is
imported, so ``PeftModel.from_pretrained`` reads a saved folder in a fresh process.
"""

from qpeft_deploy.peft_native.config import QpeftConfig
from qpeft_deploy.peft_native.register import register
from qpeft_deploy.peft_native.tuner import QpeftLayer, QpeftModel

register()

__all__ = ["QpeftConfig", "QpeftLayer", "QpeftModel"]
