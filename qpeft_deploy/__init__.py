"""qpeft-deploy: Quantum-PEFT adapters (orthogonal circuits + a diagonal spectrum) from training to deployment."""

__version__ = "0.1.0"
