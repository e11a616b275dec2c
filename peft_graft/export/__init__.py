"""Exporters: write adapters in the formats other runtimes load.

`lora_to_gguf` turns a PEFT LoRA folder into a llama.cpp LoRA adapter (GGUF). Graft adapters are LoRA-shaped (DESIGN
§9), so a graft exported to a PEFT LoRA folder goes on to llama.cpp through the same function.
"""

from .gguf import lora_to_gguf


__all__ = ["lora_to_gguf"]
