"""The LoRA bridge: .qpeft -> PEFT LoRA folder (exact) and PEFT LoRA -> .qpeft (Taylor exact, Pauli fitted)."""
