"""Compatibility with transformers releases that ask for a newer PEFT than the one peft-graft builds on.

transformers 5.24 raised the minimum PEFT version of its adapter API (`PeftAdapterMixin.add_adapter`,
`set_adapter`, `disable_adapters`, `enable_adapters`, `active_adapters`, `get_adapter_state_dict`,
`delete_adapter`) from 0.20 to 0.22, which is not released; the methods themselves are line for line those of 5.23,
where they work with PEFT 0.21. So for that release only, the requirement is set back to the installed PEFT. A
later transformers is left alone: its requirement may be real, and then the pin in pyproject.toml is what protects.
"""

from __future__ import annotations

import peft
import transformers
from packaging.version import Version


# transformers releases whose adapter API is verified to be unchanged apart from the version requirement.
_RELAXED_RELEASES = ("5.24",)
_OLDEST_PEFT = Version("0.21")


def relax_transformers_peft_requirement() -> bool:
    """Let transformers' adapter API accept the installed PEFT where that is known to be safe; True if it did."""
    from transformers.integrations import peft as integration

    installed = Version(peft.__version__)
    release = Version(transformers.__version__)
    if f"{release.major}.{release.minor}" not in _RELAXED_RELEASES or installed < _OLDEST_PEFT:
        return False
    if Version(integration.MIN_PEFT_VERSION) > installed:
        integration.MIN_PEFT_VERSION = peft.__version__
    return True
