"""SEWL on a 4-bit bitsandbytes base (bitsandbytes 0.50 runs on the CPU): it learns, the quantized base weights stay
unchanged, and the evolved state merges exactly with merge_and_dequantize."""

import pytest
import torch
import transformers
from peft import get_peft_model
from sewl_models import token_batch
from tiny_models import LLAMA_SIZES

from peft_graft import GraftConfig
from peft_graft.sewl import SEWL, SEWLConfig


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **LLAMA_SIZES | {"vocab_size": 100, "hidden_size": 128, "intermediate_size": 256}
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_sewl_on_a_4bit_base(llama_dir):
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quant, device_map="cpu")
    model = get_peft_model(base, GraftConfig(r=8, target_modules=["q_proj", "v_proj"]))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "graft_" not in k}
    sewl = SEWL(model, SEWLConfig(lr=2e-3, spectral_clip=0.5, max_step_fraction=None))
    batch = token_batch(0)
    first = sewl.score(batch)
    for _ in range(4):
        sewl.step(batch)
    assert all(r.decision == "applied" for r in sewl.log)
    assert sewl.score(batch) < first - 1e-3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    probe = token_batch(7)
    with torch.no_grad():
        evolved = model(input_ids=probe).logits
        merged = model.merge_and_dequantize()(input_ids=probe).logits
    torch.testing.assert_close(merged, evolved, atol=1e-4, rtol=1e-4)
