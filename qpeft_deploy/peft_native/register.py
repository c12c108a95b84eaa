"""Registration with PEFT's own registry: ``PeftType.QPEFT`` and ``register_peft_method(name="qpeft")``.

PEFT's ``register_peft_method`` accepts only names that ``PeftType`` already lists, so the enum gains a
``QPEFT`` member first (the way the enum's own metaclass adds members). Idempotent.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from qpeft_deploy.peft_native.config import PEFT_TYPE, QpeftConfig
from qpeft_deploy.peft_native.tuner import QpeftModel


def _add_peft_type(name: str) -> None:
    """Add member ``name`` (value ``name``) to PEFT's ``PeftType`` enum."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)


def register() -> None:
    """Make ``get_peft_model`` / ``PeftModel.from_pretrained`` know ``peft_type="QPEFT"`` (once)."""
    _add_peft_type(PEFT_TYPE)
    if PeftType.QPEFT not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_TYPE.lower(), config_cls=QpeftConfig, model_cls=QpeftModel)
