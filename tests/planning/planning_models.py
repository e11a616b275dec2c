"""Tiny real models for checking the planner's figures: configs saved without weights, bases quantized for real."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
import transformers
from peft import PeftConfig, get_peft_model
from tiny_models import LLAMA_SIZES


# Widths that are multiples of 64, as bitsandbytes' NF4 blocks are; 3 layers so interior layers exist.
SIZES = LLAMA_SIZES | dict(num_hidden_layers=3, vocab_size=256)


def tiny_decoder(model_type: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **(SIZES | overrides))
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def quantized(model: transformers.PreTrainedModel, folder: Path, **bnb) -> transformers.PreTrainedModel:
    """``model`` saved in bf16 and loaded back through bitsandbytes on the CPU, as users load a 4-/8-bit base."""
    model.to(torch.bfloat16).save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**bnb), device_map="cpu", dtype=torch.bfloat16
    )


def adapted(model: torch.nn.Module, config: PeftConfig, folder: Path | None = None):
    """``get_peft_model`` on a copy of ``config`` (PEFT resolves it in place), saved to ``folder`` if given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, copy.deepcopy(config))
    if folder is not None:
        peft_model.save_pretrained(folder)
    return peft_model


def tensor_data_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file: the file less its 8-byte length and JSON header."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    json.loads(raw[8 : 8 + length])  # a real header
    return len(raw) - 8 - length


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage a model holds: parameters, buffers and bitsandbytes' quantization state."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        if getattr(weight, "SCB", None) is not None:
            tensors.append(weight.SCB)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
