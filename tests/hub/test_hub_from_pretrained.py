"""`PeftModel.from_pretrained(base, "org/name")` straight from the Hub, as a user would load a published graft."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from safetensors.torch import load_file, save_file

from peft_graft.errors import AdapterIntegrityError
from peft_graft.hub import push_graft


def test_from_pretrained_repo_id_gives_identical_logits(
    local_hub, repo_id, save_graft, accepted_record, metrics, tiny_llama, tokens
):
    adapter = save_graft()
    push_graft(adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)

    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), adapter).eval()(tokens).logits
        from_hub = PeftModel.from_pretrained(tiny_llama(), repo_id).eval()(tokens).logits
    assert torch.equal(from_hub, expected)


# A fresh interpreter configured only through the environment, with the same loopback guard as conftest.py.
_CHILD = textwrap.dedent(
    """
    import sys, torch, huggingface_hub, peft_graft
    from huggingface_hub.utils import _http
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import load_file, save_file

    def loopback_only():
        client = _http.default_client_factory()
        client.event_hooks["request"].insert(0, lambda r: None if r.url.host == "127.0.0.1" else sys.exit(str(r.url)))
        return client

    huggingface_hub.set_client_factory(loopback_only)
    repo_id, config_file, tokens_file = sys.argv[1:4]
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig.from_json_file(config_file)).eval()
    model = PeftModel.from_pretrained(base, repo_id).eval()
    with torch.no_grad():
        save_file({"logits": model(load_file(tokens_file)["tokens"]).logits}, tokens_file + ".logits")
    """
)


def test_hf_endpoint_in_the_environment_is_all_a_user_needs(
    local_hub, repo_id, save_graft, accepted_record, metrics, tiny_llama, tokens, tmp_path
):
    adapter = save_graft()
    push_graft(adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)
    base = tiny_llama()
    base.config.to_json_file(tmp_path / "config.json")
    save_file({"tokens": tokens}, tmp_path / "tokens.pt")
    env = {
        **os.environ,
        "HF_ENDPOINT": local_hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    args = [repo_id, str(tmp_path / "config.json"), str(tmp_path / "tokens.pt")]
    subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, check=True, timeout=180)

    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, adapter).eval()(tokens).logits
    assert torch.equal(load_file(tmp_path / "tokens.pt.logits")["logits"], expected)


def test_from_pretrained_repo_id_checks_the_repo_manifest(
    local_hub, repo_id, save_graft, accepted_record, metrics, tiny_llama, tokens
):
    """Weights replaced on the Hub behind the graft's back (a plain upload, no metadata) are refused at load, and the
    caller's base model is left as it was."""
    adapter = save_graft()
    push_graft(adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)
    weights = load_file(adapter / "adapter_model.safetensors")
    forged = {k: (v * 2 if v.is_floating_point() else v) for k, v in weights.items()}  # same keys, shapes, dtypes
    forged_file = adapter.parent / "forged.safetensors"
    save_file(forged, forged_file)
    HfApi().upload_file(path_or_fileobj=str(forged_file), path_in_repo="adapter_model.safetensors", repo_id=repo_id)

    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors does not match"):
        PeftModel.from_pretrained(base, repo_id)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
