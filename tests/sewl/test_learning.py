"""SEWL learns on real text: SmolLM2-135M (a real pretrained Llama) reading a real news article. Observing its first
half lowers the loss of that half and of the unseen second half, with no extra token in any prompt."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import GraftConfig
from peft_graft.sewl import SEWL, SEWLConfig


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("rule, lr", [("fisher", 3e-2), ("kfac", 0.1)])
def test_observing_a_passage_lowers_its_loss_and_a_related_passage(smollm2_dir, news_corpus, rule, lr):
    # Default rails: K-FAC's first steps (factors of one chunk) are far outside the step limit and get shortened.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    model = get_peft_model(
        base,
        GraftConfig(
            r=16,
            projection="svd",
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            layers_to_transform=[26, 27, 28, 29],
        ),
    )
    ids = tokenizer(news_corpus["test"][0], return_tensors="pt")["input_ids"][0]
    passage, related = ids[:128], ids[128:256]
    sewl = SEWL(model, SEWLConfig(rule=rule, lr=lr, last_k=4), tokenizer=tokenizer)
    before_passage, before_related = sewl.score(passage), sewl.score(related)
    sewl.observe(tokenizer.decode(passage))
    sewl.step(passage)
    assert [r.decision for r in sewl.log] == ["applied", "applied"]
    after_passage, after_related = sewl.score(passage), sewl.score(related)
    assert after_passage < before_passage - 0.03
    assert after_related < before_related - 0.002  # the unseen rest of the same article
    with torch.no_grad():  # the state also reaches generation, through the adapter, with the plain prompt
        out = model.generate(input_ids=passage[:8].unsqueeze(0), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
