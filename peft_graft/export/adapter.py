"""Export a saved graft adapter folder for runtimes without peft-graft: a plain PEFT LoRA folder (PEFT, vLLM, TGI) or
a llama.cpp GGUF LoRA file. What `peft-graft export` runs.

The graft is loaded onto its base first: output-mode grafts and seeded projections need the base weights, and a
load runs every check (manifest, tensors, shapes), so nothing damaged is exported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..tuners.graft.integrity import read_config
from .gguf import lora_to_gguf


FORMATS = ("peft-lora", "gguf-lora")


def load_base(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> Any:
    """The base model of the graft in ``adapter_dir`` (``base``, else the config's ``base_model_name_or_path``): the
    class its config names, else the head class the adapter's task type asks for."""
    import transformers

    config = read_config(adapter_dir)
    base = base or config.base_model_name_or_path
    if not base:
        raise ExportError(f"{adapter_dir} does not name its base model; pass the base folder or Hub id explicitly.")
    architectures = transformers.AutoConfig.from_pretrained(base).architectures or []
    named = getattr(transformers, architectures[0], None) if architectures else None
    task = getattr(config.task_type, "value", config.task_type)
    auto = named or {
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "TOKEN_CLS": transformers.AutoModelForTokenClassification,
        "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
    }.get(task, transformers.AutoModel)
    return auto.from_pretrained(base)


def export_adapter(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "peft-lora",
    base: str | os.PathLike | None = None,
    outtype: str = "f32",
) -> Path:
    """Write the graft saved in ``adapter_dir`` as ``format`` at ``out`` (a folder for ``peft-lora``, a ``.gguf``
    file for ``gguf-lora``); returns ``out``. ``base``: the base model's folder or Hub id (default: the one the
    adapter's config names); for GGUF it must be a local folder (its config gives llama.cpp's architecture)."""
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(adapter_dir, base), str(adapter_dir))
    if format == "peft-lora":
        return model.to_lora(out, graft_dir=adapter_dir)
    with tempfile.TemporaryDirectory(prefix="graft-lora-") as tmp:
        lora = model.to_lora(Path(tmp) / "lora", graft_dir=adapter_dir)
        return lora_to_gguf(lora, out, base_config=model.get_base_model().config, outtype=outtype)
