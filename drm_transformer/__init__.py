"""DRM geometric Transformer as a Hugging Face causal LM; importing this package registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_drm import DRM_PRESETS, DRMConfig
from .modeling_drm import DRMForCausalLM, DRMModel, DRMPreTrainedModel


AutoConfig.register(DRMConfig.model_type, DRMConfig, exist_ok=True)
AutoModel.register(DRMConfig, DRMModel, exist_ok=True)
AutoModelForCausalLM.register(DRMConfig, DRMForCausalLM, exist_ok=True)

__all__ = [
    "DRM_PRESETS",
    "DRMConfig",
    "DRMForCausalLM",
    "DRMModel",
    "DRMPreTrainedModel",
]
