"""Grafts attach to DRM like to any HF model, through the default target mapping for model_type "drm"."""

import torch
from drm_testing import DRM_PROJECTIONS, tiny_config
from peft import PeftModel, get_peft_model

from drm_transformer import DRMForCausalLM
from peft_graft import GraftConfig, GraftLayer


def test_default_targets_merge_and_round_trip(tmp_path):
    torch.manual_seed(0)
    base = DRMForCausalLM(tiny_config()).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    tokens = torch.randint(0, 61, (2, 9))
    model = get_peft_model(base, GraftConfig(r=2, init_weights=False))  # no target_modules: the "drm" mapping
    grafted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, GraftLayer)}
    assert grafted == set(DRM_PROJECTIONS)
    out = model(tokens).logits
    model.save_pretrained(tmp_path)

    fresh = DRMForCausalLM(tiny_config()).eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path)(tokens).logits, out, atol=0, rtol=0)
    torch.testing.assert_close(model.merge_and_unload()(tokens).logits, out, atol=1e-5, rtol=1e-5)
