"""Make GRAFT a first-class PEFT method.

PEFT's `PeftType` is a closed `enum`, and `register_peft_method` only accepts names that are already members, so the
member is added at import time, then config, tuner and prefix are registered. Both steps are idempotent: importing
peft_graft twice (or reloading it) is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


GRAFT_NAME = "graft"
GRAFT_PREFIX = "graft_"


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to `PeftType` (a `str` enum) unless it is already there, and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    # Set the class attribute first: once the name is in _member_map_, EnumType refuses to (re)assign it.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


GRAFT_PEFT_TYPE = _extend_peft_type(GRAFT_NAME.upper())


def register_graft_method() -> None:
    """Register `GraftConfig` / `GraftModel` with PEFT and install the save/load hooks (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from . import integration
    from .tuners.graft import GraftConfig, GraftModel

    integration.install()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(GRAFT_PEFT_TYPE) is GraftModel:
        return
    register_peft_method(name=GRAFT_NAME, config_cls=GraftConfig, model_cls=GraftModel, prefix=GRAFT_PREFIX)
