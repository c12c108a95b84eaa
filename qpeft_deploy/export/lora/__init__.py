"""The LoRA bridge: .qpeft -> PEFT LoRA folder (exact) and PEFT LoRA -> .qpeft (Taylor exact, Pauli fitted).

``peft_folder`` (the PEFT folder format both directions share: names, reading and checking, writing),
``export`` (.qpeft -> LoRA), ``importer`` (LoRA -> .qpeft), ``calibrate`` (calibration on task data). The
Stiefel logarithm the Taylor import needs is ``qpeft_deploy.core.taylor.stiefel_log``.
"""
