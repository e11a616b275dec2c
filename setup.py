"""Package list for setuptools; all other metadata is in pyproject.toml.

`model_cards/` sits at the repository root (templates a reader finds beside the code, not inside it) and installs as
`peft_graft.model_cards`. pyproject's automatic package discovery cannot map a root folder into a package, so the
list is computed here: every package under peft_graft/ and drm_transformer/, plus that one mapping.
"""

from setuptools import find_packages, setup


setup(
    packages=[*find_packages(include=["peft_graft*", "drm_transformer*"]), "peft_graft.model_cards"],
    package_dir={"peft_graft.model_cards": "model_cards"},
)
