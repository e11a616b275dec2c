"""Jinja model-card templates rendered with `huggingface_hub.ModelCard.from_template`."""

from pathlib import Path


GRAFT_ADAPTER_TEMPLATE = Path(__file__).with_name("graft_adapter.md")

__all__ = ["GRAFT_ADAPTER_TEMPLATE"]
