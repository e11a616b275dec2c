"""Exact export of graft adapters to plain PEFT LoRA folders (`export_lora`, ``peft_model.to_lora``).

Every case of the table is exported here, then all exported folders are loaded in ONE separate Python process that
never imports peft_graft: it loads the saved base, applies the LoRA with plain ``PeftModel.from_pretrained`` and
compares its logits with the graft's, recorded here. 4-bit cases run both forwards in train mode (Llama has no
dropout): bitsandbytes then computes dequantize(W) @ x in fp32 instead of repacking weights for its bf16 CPU kernel.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, tiny_llama

import peft_graft
from peft_graft import CalibrationRequiredError, GraftConfig, GraftLayer
from peft_graft.errors import ExportError
from peft_graft.manifest import check_manifest
from peft_graft.tuners.graft.config import MODES, PROJECTIONS
from peft_graft.tuners.graft.lora_export import export_lora
from peft_graft.tuners.graft.phi import PHI_FAMILIES


TARGETS = ["q_proj", "v_proj", "down_proj"]
TOLERANCE = 1e-5  # fp32 logits: the LoRA's products are rounded differently from the graft's B → Φ → A
TOLERANCE_4BIT = 1e-5  # same dequantized weights on both sides: measured 3e-7, as in fp32
QUANT_4BIT = dict(load_in_4bit=True, bnb_4bit_compute_dtype="float32")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@dataclass
class Case:
    """One model to graft and export: ``build(base_dir)`` returns the PEFT model; every adapter is exported."""

    build: Callable[[Path], PeftModel]
    base: str = "llama"  # key of the saved base models
    adapters: tuple[str, ...] = ("default",)
    quantized: bool = False
    export_kwargs: dict = field(default_factory=dict)


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": (ids := torch.randint(0, 100, (2, 12), generator=g)), "labels": ids} for _ in range(2)]


def load_base(base_dir: Path, quantized: bool = False) -> transformers.PreTrainedModel:
    if quantized:
        config = transformers.BitsAndBytesConfig(**QUANT_4BIT)
        return transformers.AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=config, device_map="cpu"
        )
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def grafted(base_dir: Path, quantized: bool = False, calibrate: bool = False, **kwargs) -> PeftModel:
    kwargs = dict(r=8, target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM") | kwargs
    model = get_peft_model(load_base(base_dir, quantized), GraftConfig(**kwargs))
    if calibrate:
        peft_graft.calibrate(model, calibration_batches(), progress=False)
    return model


def perturb(tensors, seed: int, std: float = 0.1) -> None:
    """Stand-in for training: move tensors off their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=g) * std)


def phi_case(phi: str, projection: str, mode: str) -> Case:
    def build(base_dir: Path) -> PeftModel:
        model = grafted(
            base_dir, calibrate=projection in ("activation", "gradient"), phi=phi, projection=projection, mode=mode,
            rank_pattern={"down_proj": 4},
        )
        if projection == "trainable":  # trained projections are no longer orthonormal
            layers = [m for m in model.modules() if isinstance(m, GraftLayer)]
            perturb([t for m in layers for t in (m.graft_proj["default"].A, m.graft_proj["default"].B)], seed=3)
        return model

    return Case(build)


def two_adapters(base_dir: Path) -> PeftModel:
    model = grafted(base_dir, phi="dense", target_modules=["q_proj", "v_proj"])
    config = GraftConfig(r=4, phi="diagonal", projection="svd", mode="output", init_weights=False,
                         target_modules=["q_proj", "up_proj"], task_type="CAUSAL_LM")
    model.add_adapter("second", config)
    return model


def with_modules_to_save(base_dir: Path) -> PeftModel:
    model = grafted(base_dir, phi="triangular", modules_to_save=["lm_head"])
    perturb([model.base_model.model.lm_head.modules_to_save["default"].weight], seed=4)
    return model


def with_trainable_tokens(base_dir: Path) -> PeftModel:
    model = grafted(base_dir, phi="dense", trainable_token_indices=[1, 4, 7])
    perturb([p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], seed=6)
    return model


def tied_embedding_copy(base_dir: Path) -> PeftModel:
    model = grafted(base_dir, modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    perturb([model.base_model.model.model.embed_tokens.modules_to_save["default"].weight], seed=7)
    return model


def gpt2(bias: str, **kwargs) -> Callable[[Path], PeftModel]:
    def build(base_dir: Path) -> PeftModel:
        model = grafted(base_dir, target_modules=["c_attn", "c_proj", "c_fc"], bias=bias, **kwargs)
        if bias != "none":  # trained biases: all of them, or only those of the grafted layers
            names = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
            owned = [n for n in names if bias == "all" or n.endswith(".base_layer.bias")]
            perturb([model.get_parameter(n) for n in owned], seed=5)
        return model

    return build


CASES: dict[str, Case] = {
    **{
        f"llama-{phi}-{projection}-{mode}": phi_case(phi, projection, mode)
        for phi, projection, mode in itertools.product(PHI_FAMILIES, PROJECTIONS, MODES)
    },
    "llama-two-adapters": Case(two_adapters, adapters=("default", "second")),
    "llama-modules-to-save": Case(with_modules_to_save),
    "llama-trainable-tokens": Case(with_trainable_tokens),
    "llama-tied-embedding-copy": Case(tied_embedding_copy, base="llama-tied"),
    "llama-regex-targets": Case(lambda d: grafted(d, target_modules=r".*layers\.1\..*(q_proj|up_proj)")),
    "llama-all-linear": Case(lambda d: grafted(d, target_modules="all-linear", phi="banded", mode="output")),
    "llama-layers-to-transform": Case(
        lambda d: grafted(d, target_modules=["q_proj", "o_proj"], layers_to_transform=[0])
    ),
    "llama-scaling-no-task": Case(lambda d: grafted(d, scaling=0.5, phi="lowrank", task_type=None)),
    "llama-bin": Case(lambda d: grafted(d, mode="output"), export_kwargs={"safe_serialization": False}),
    "gpt2-additive": Case(gpt2("none", phi="dense", projection="svd"), base="gpt2"),
    "gpt2-output-bias-all": Case(gpt2("all", phi="hadamard", mode="output"), base="gpt2"),
    "gpt2-bias-graft-only": Case(gpt2("graft_only", phi="diagonal", projection="trainable"), base="gpt2"),
    "llama4bit-output-svd": Case(
        lambda d: grafted(d, True, projection="svd", mode="output"), base="llama128", quantized=True
    ),
    "llama4bit-additive-orthogonal": Case(
        lambda d: grafted(d, True, projection="orthogonal", phi="banded"), base="llama128", quantized=True
    ),
}


# The loader: a separate process that never imports peft_graft. Argument 1: JSON list of cases; argument 2: where to
# write {case: {"max_abs": ..., "lora_layers": ..., "warnings": [...]}}.
LOADER = textwrap.dedent(
    """
    import copy, json, sys, warnings
    import torch, transformers
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    cases, results, bases = json.load(open(sys.argv[1])), {}, {}
    for case in cases:
        if case["quantization"]:
            config = transformers.BitsAndBytesConfig(**case["quantization"])
            base = transformers.AutoModelForCausalLM.from_pretrained(
                case["base_dir"], quantization_config=config, device_map="cpu")
        else:
            if case["base_dir"] not in bases:
                bases[case["base_dir"]] = transformers.AutoModelForCausalLM.from_pretrained(
                    case["base_dir"], dtype=torch.float32)
            base = copy.deepcopy(bases[case["base_dir"]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, case["lora_dir"])
        assert type(model.peft_config["default"]) is LoraConfig
        expected = load_file(case["expected"])
        model.train(case["train"])
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        results[case["name"]] = {
            "max_abs": (logits - expected["logits"]).abs().max().item(),
            "lora_layers": sum(isinstance(m, LoraLayer) for m in model.modules()),
            "warnings": [str(w.message) for w in caught if "key" in str(w.message).lower()],
        }
    assert "peft_graft" not in sys.modules, "the loader imported peft_graft"
    json.dump(results, open(sys.argv[2], "w"))
    """
)


@dataclass
class Exported:
    folders: dict[str, Path]  # "<case>/<adapter>" -> LoRA folder
    modules: dict[str, list[str]]  # "<case>/<adapter>" -> grafted module names
    graft_effect: dict[str, float]  # max |graft - base| of the logits
    unchanged: dict[str, bool]  # state dict equal before and after the export
    loaded: dict[str, dict]  # what the loader process measured


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    models = {
        "llama": tiny_llama(vocab_size=100),
        "llama-tied": tiny_llama(vocab_size=100, tie_word_embeddings=True),
        "llama128": tiny_llama(vocab_size=100, hidden_size=128, intermediate_size=256),  # whole 4-bit blocks
        "gpt2": ARCHS["gpt2"].fresh(),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, input_ids, train: bool) -> torch.Tensor:
    model.train(train)
    return model(input_ids=input_ids).logits


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


@pytest.fixture(scope="module")
def exported(base_dirs, input_ids, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("exports")
    result = Exported({}, {}, {}, {}, {})
    jobs = []
    base_logits = {
        (name, quantized): logits(load_base(path, quantized), input_ids, train=quantized)
        for name, path in base_dirs.items()
        for quantized in ((False, True) if name == "llama128" else (False,))
    }
    for name, case in CASES.items():
        model = case.build(base_dirs[case.base])
        for adapter in case.adapters:
            key = f"{name}/{adapter}"
            model.set_adapter(adapter)
            expected = logits(model, input_ids, train=case.quantized)
            before = state(model)
            out = export_lora(model, root / name / adapter, adapter, **case.export_kwargs)
            result.unchanged[key] = equal_states(before, state(model))
            result.folders[key] = out
            result.modules[key] = sorted(n for n, m in model.base_model.model.named_modules()
                                         if isinstance(m, GraftLayer) and adapter in m.graft_phi)
            result.graft_effect[key] = (expected - base_logits[case.base, case.quantized]).abs().max().item()
            save_file({"input_ids": input_ids, "logits": expected}, out.parent / f"{adapter}.expected.safetensors")
            jobs.append({
                "name": key, "base_dir": str(base_dirs[case.base]), "lora_dir": str(out),
                "expected": str(out.parent / f"{adapter}.expected.safetensors"),
                "quantization": QUANT_4BIT if case.quantized else None, "train": case.quantized,
            })
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run(
        [sys.executable, "-c", LOADER, str(root / "jobs.json"), str(root / "results.json")],
        check=False, capture_output=True, text=True, cwd=root, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result.loaded = json.loads((root / "results.json").read_text())
    return result


CASE_KEYS = [f"{name}/{adapter}" for name, case in CASES.items() for adapter in case.adapters]


@pytest.mark.parametrize("key", CASE_KEYS)
def test_plain_peft_reproduces_the_graft(exported: Exported, key: str, record_property) -> None:
    loaded = exported.loaded[key]
    record_property("max_abs", loaded["max_abs"])
    assert exported.graft_effect[key] > 1e-3, "the graft must change the logits for the comparison to mean anything"
    assert loaded["warnings"] == []  # no missing or unexpected keys
    assert loaded["lora_layers"] == len(exported.modules[key])
    limit = TOLERANCE_4BIT if key.startswith("llama4bit") else TOLERANCE
    assert loaded["max_abs"] <= limit, (key, loaded["max_abs"])


@pytest.mark.parametrize("key", CASE_KEYS)
def test_export_leaves_the_model_unchanged(exported: Exported, key: str) -> None:
    assert exported.unchanged[key]


def test_measured_differences(exported: Exported) -> None:
    """Max |Δ logits| per group of cases, printed with ``-s`` (the figures the README quotes)."""
    groups: dict[str, float] = {}
    for key, loaded in exported.loaded.items():
        group = key.split("-")[0] + ("-output" if "-output" in key else "")
        groups[group] = max(groups.get(group, 0.0), loaded["max_abs"])
    print("\nmax |Δ logits| LoRA vs graft:", {g: f"{v:.1e}" for g, v in sorted(groups.items())})
    assert groups


def saved_config(exported: Exported, key: str) -> dict:
    return json.loads((exported.folders[key] / "adapter_config.json").read_text())


def test_config_is_a_plain_lora_config(exported: Exported) -> None:
    config = saved_config(exported, "llama-dense-svd-additive/default")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 8 and config["lora_dropout"] == 0.0
    assert config["rank_pattern"] == config["alpha_pattern"] == {"down_proj": 4}
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert Path(config["base_model_name_or_path"]).name == "llama"
    assert not config["fan_in_fan_out"] and config["bias"] == "none" and not config["use_rslora"]

    gpt2 = saved_config(exported, "gpt2-output-bias-all/default")
    assert gpt2["fan_in_fan_out"] and gpt2["bias"] == "all"
    assert saved_config(exported, "gpt2-bias-graft-only/default")["bias"] == "lora_only"
    assert saved_config(exported, "llama-modules-to-save/default")["modules_to_save"] == ["lm_head"]
    second = saved_config(exported, "llama-two-adapters/second")
    assert second["r"] == 4 and sorted(second["target_modules"]) == ["q_proj", "up_proj"]


def test_targets_keep_the_graft_patterns_when_peft_matches_the_same_modules(exported: Exported) -> None:
    regex = saved_config(exported, "llama-regex-targets/default")["target_modules"]
    assert regex == r".*layers\.1\..*(q_proj|up_proj)"
    layers = saved_config(exported, "llama-layers-to-transform/default")
    assert sorted(layers["target_modules"]) == ["o_proj", "q_proj"] and layers["layers_to_transform"] == [0]
    # "all-linear" is resolved by PEFT against the bare base; the export lists the exact modules instead
    all_linear = saved_config(exported, "llama-all-linear/default")
    assert sorted(all_linear["target_modules"]) == exported.modules["llama-all-linear/default"]


def test_weights_use_peft_lora_keys_and_shapes(exported: Exported) -> None:
    key = "llama-hadamard-orthogonal-output/default"
    tensors = load_file(exported.folders[key] / "adapter_model.safetensors")
    expected = {f"base_model.model.{m}.lora_{ab}.weight" for m in exported.modules[key] for ab in "AB"}
    assert set(tensors) == expected
    down = "base_model.model.model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.lora_A.weight"].shape == (4, 128) and tensors[f"{down}.lora_B.weight"].shape == (64, 4)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    gpt2 = load_file(exported.folders["gpt2-additive/default"] / "adapter_model.safetensors")
    c_attn = "base_model.model.transformer.h.0.attn.c_attn"  # Conv1D weight (32, 96): in=32, out=96
    assert gpt2[f"{c_attn}.lora_A.weight"].shape == (8, 32) and gpt2[f"{c_attn}.lora_B.weight"].shape == (96, 8)
    key = "gpt2-bias-graft-only/default"
    biases = {k for k in load_file(exported.folders[key] / "adapter_model.safetensors") if k.endswith(".bias")}
    assert biases == {f"base_model.model.{m}.base_layer.bias" for m in exported.modules[key]}
    all_biases = [k for k in load_file(exported.folders["gpt2-output-bias-all/default"] / "adapter_model.safetensors")
                  if k.endswith(".bias")]
    assert len(all_biases) == 2 * 6 + 1  # per block: ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj; then ln_f
    assert (exported.folders["llama-bin/default"] / "adapter_model.bin").is_file()
    assert not (exported.folders["llama-bin/default"] / "adapter_model.safetensors").exists()


def test_model_card(exported: Exported) -> None:
    card = (exported.folders["llama-diagonal-svd-output/default"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "base_model:" in card
    for text in ("exported exactly from", "`diagonal`", "`svd`", "`output`", "peft-graft is not needed", "vLLM",
                 "from peft import PeftModel", "none recorded"):
        assert text in card, text


# ------------------------------------------------------------------ provenance and refusals


def test_card_names_the_graft_id_of_the_folder_the_adapter_came_from(base_dirs, tmp_path) -> None:
    model = grafted(base_dirs["llama"], phi="dense")
    model.save_pretrained(tmp_path / "graft")
    graft_id = check_manifest(tmp_path / "graft")
    loaded = PeftModel.from_pretrained(load_base(base_dirs["llama"]), tmp_path / "graft")

    out = loaded.to_lora(tmp_path / "lora", graft_dir=tmp_path / "graft")
    assert f"`{graft_id}`" in (out / "README.md").read_text()

    grafted(base_dirs["llama"], phi="dense", seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(ExportError, match="holds another adapter"):
        loaded.to_lora(tmp_path / "lora2", graft_dir=tmp_path / "other")
    assert not (tmp_path / "lora2").exists()


def test_sparse_residual_is_refused(base_dirs, tmp_path) -> None:
    model = grafted(base_dirs["llama"], sparse_residual=8, calibrate=True)
    with pytest.raises(ExportError, match="sparse residual.*full-rank"):
        model.to_lora(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_merged_adapter_is_refused(base_dirs, tmp_path) -> None:
    model = grafted(base_dirs["llama"])
    model.merge_adapter()
    with pytest.raises(ExportError, match="unmerge_adapter"):
        model.to_lora(tmp_path / "lora")
    model.unmerge_adapter()
    assert (model.to_lora(tmp_path / "lora") / "adapter_model.safetensors").is_file()


def test_uncalibrated_unknown_and_destination_refusals(base_dirs, tmp_path) -> None:
    with pytest.raises(CalibrationRequiredError):
        grafted(base_dirs["llama"], projection="activation").to_lora(tmp_path / "a")
    model = grafted(base_dirs["llama"])
    with pytest.raises(ExportError, match="no adapter 'nope'"):
        model.to_lora(tmp_path / "b", adapter_name="nope")
    model.save_pretrained(tmp_path / "graft")
    with pytest.raises(ExportError, match="holds a graft adapter"):
        model.to_lora(tmp_path / "graft")
    assert not any((tmp_path / name).exists() for name in ("a", "b"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exporting itself warns about nothing
        model.to_lora(tmp_path / "ok")
