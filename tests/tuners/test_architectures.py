"""Graft adapters on real transformers architectures, each built from a tiny config (see conftest.py).

Covers, per architecture: PEFT's default target modules and an explicit list, identity at init, random init,
merge_and_unload equivalence, training (only adapter weights get gradients) and a save / reload round trip.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, PeftType, convert_to_lora, get_peft_model, save_as_lora
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file

import peft_graft
from peft_graft import GraftLayer


# `arch` (a conftest.TinyArch) is the parametrized fixture from conftest.py.

TASK_TYPES = {"causal": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
# (phi, projection, mode): each merge test runs a few structurally different grafts.
GRAFT_VARIANTS = [
    ("dense", "svd", "additive"),
    ("banded", "orthogonal", "output"),
    ("hadamard", "trainable", "additive"),
    ("lowrank", "svd", "output"),
]


def graft_config(arch, targets: str, **overrides) -> peft_graft.GraftConfig:
    kwargs = {"r": 4, "task_type": TASK_TYPES[arch.kind], **arch.peft_kwargs}
    kwargs["target_modules"] = None if targets == "default" else list(arch.explicit_targets)
    kwargs.update(overrides)
    return peft_graft.GraftConfig(**kwargs)


def expected_targets(arch, model: torch.nn.Module, targets: str) -> set[str]:
    if targets == "default":
        return set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model.config.model_type])
    return set(arch.explicit_targets)


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits and the last hidden state, flattened: BERT's 2-class logits alone are too small to show a graft."""
    model.eval()
    out = model(**batch, output_hidden_states=True)
    hidden = out.decoder_hidden_states if "decoder_hidden_states" in out else out.hidden_states
    return torch.cat([out.logits.flatten(), hidden[-1].flatten()])


def is_adapter_param(name: str) -> bool:
    return "graft_" in name or "modules_to_save" in name


@pytest.mark.parametrize("targets", ["default", "explicit"])
def test_identity_at_init_and_targets(arch, targets: str) -> None:
    base = arch.fresh()
    batch = arch.batch()
    expected = logits(base, batch)
    model = get_peft_model(base, graft_config(arch, targets, init_weights=True))

    grafted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, GraftLayer)}
    assert grafted == expected_targets(arch, base, targets)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", ["default", "explicit"])
def test_random_init_changes_outputs(arch, targets: str) -> None:
    batch = arch.batch()
    expected = logits(arch.fresh(), batch)
    model = get_peft_model(arch.fresh(), graft_config(arch, targets, init_weights=False))
    changed = logits(model, batch)
    assert torch.isfinite(changed).all()
    assert (changed - expected).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)


def train_head_copies(model: torch.nn.Module) -> None:
    """Stand-in for training the ``modules_to_save`` copies (a classification head)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))


@pytest.mark.parametrize("phi,projection,mode", GRAFT_VARIANTS)
def test_merge_and_unload_matches_unmerged(arch, phi: str, projection: str, mode: str) -> None:
    batch = arch.batch()
    base_logits = logits(arch.fresh(), batch)
    model = get_peft_model(
        arch.fresh(), graft_config(arch, "explicit", init_weights=False, phi=phi, projection=projection, mode=mode)
    )
    train_head_copies(model)  # merging must keep them, not the base's head
    unmerged = logits(model, batch)
    assert (unmerged - base_logits).abs().max() > 1e-4  # the graft does something worth merging

    merged_model = model.merge_and_unload()
    assert not any(isinstance(m, GraftLayer) for m in merged_model.modules())
    torch.testing.assert_close(logits(merged_model, batch), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("phi,projection,mode", GRAFT_VARIANTS)
def test_peft_save_as_lora_reproduces_the_graft(arch, phi: str, projection: str, mode: str, tmp_path) -> None:
    """PEFT's own ``save_as_lora`` (an SVD of each layer's ``get_delta_weight``) at the grafts' rank writes a plain
    LoRA that ``PeftModel.from_pretrained`` loads and that computes what the grafts compute: ΔW comes in the base
    weight's layout (GPT-2's Conv1D is stored in×out), output-mode ΔW = s·AΦB·W has rank r too. An output-mode graft
    merged into its base cannot say its ΔW any more and refuses, typed as PEFT refuses unsupported layers."""
    if arch.name == "roberta":
        pytest.skip("PEFT's conversion copies a modules_to_save head by parameter name alone (RoBERTa's head nests)")
    batch = arch.batch()
    config = graft_config(arch, "explicit", init_weights=False, phi=phi, projection=projection, mode=mode)
    model = get_peft_model(arch.fresh(), config)
    train_head_copies(model)
    expected = logits(model, batch)

    save_as_lora(tmp_path, model, rank=config.r)
    lora = PeftModel.from_pretrained(arch.fresh(), tmp_path)
    assert lora.peft_config["default"].peft_type == PeftType.LORA
    torch.testing.assert_close(logits(lora, batch), expected, atol=1e-4, rtol=0)

    model.merge_adapter()
    if mode == "output":
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(model, rank=config.r)


@pytest.mark.parametrize("targets", ["default", "explicit"])
def test_training_reduces_loss_and_touches_only_adapters(arch, targets: str) -> None:
    batch = arch.batch()
    model = get_peft_model(arch.fresh(), graft_config(arch, targets, init_weights=True))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter_param(n)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    assert all(is_adapter_param(n) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=5e-2)

    model.train()
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad and all(is_adapter_param(n) for n in with_grad), sorted(with_grad)
            phi_grads = [p.grad for n, p in model.named_parameters() if "graft_phi" in n]
            assert phi_grads and any(g.abs().max() > 0 for g in phi_grads)
        optimizer.step()
        losses.append(loss.item())

    final = model(**batch).loss.item()
    assert final < losses[0] - 5e-3, (losses, final)
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), f"frozen parameter {name} changed"


@pytest.mark.parametrize("projection", ["svd", "orthogonal", "trainable"])
def test_save_and_reload_on_fresh_base(arch, projection: str, tmp_path) -> None:
    batch = arch.batch()
    model = get_peft_model(arch.fresh(), graft_config(arch, "explicit", init_weights=False, projection=projection))
    with torch.no_grad():  # move every trainable tensor (Φ, trainable A/B, classifier) away from its init
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(is_adapter_param(k) or "classifier" in k for k in saved), sorted(saved)
    assert any(".A" in k for k in saved) == (projection != "orthogonal")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(arch.fresh(), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)

    result = loaded.load_adapter(tmp_path, adapter_name="again")
    assert list(result.missing_keys) == []
    assert not [k for k in result.unexpected_keys if "graft_" in k]
    loaded.set_adapter("again")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
