"""Exporters: write adapters in the formats other runtimes load.

`export_adapter` writes a saved graft as a plain PEFT LoRA folder or a GGUF LoRA file (`peft-graft export`);
`lora_to_gguf` turns a PEFT LoRA folder into a llama.cpp LoRA adapter (GGUF). Graft adapters are LoRA-shaped (DESIGN
§9), so a graft exported to a PEFT LoRA folder goes on to llama.cpp through the same function.
"""

from .adapter import FORMATS, export_adapter, load_base
from .gguf import lora_to_gguf


__all__ = ["FORMATS", "export_adapter", "load_base", "lora_to_gguf"]
