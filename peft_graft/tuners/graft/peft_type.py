"""`PeftType.GRAFT`: PEFT's method enum is closed, so the member is added when the tuner is imported.

`register_peft_method` only accepts names that are already `PeftType` members, and `GraftConfig` sets its
``peft_type`` from this member, so it must exist before the config class is used. Adding it is idempotent: importing
peft_graft twice (or reloading it) is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


GRAFT_NAME = "graft"
GRAFT_PREFIX = "graft_"  # every adapter tensor name carries it, so PEFT finds adapter keys by prefix


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
