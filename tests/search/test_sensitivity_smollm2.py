"""On a real pretrained model and real text, the projected-gradient score points at modules where a graft pays.

The full measurement (Spearman ρ of every score over a spread of single-module grafts) is
benchmarks/search_sensitivity.py; here only its robust end: the top-scored module's graft lowers held-out loss, and by
more than the bottom-scored module's graft, whose projected gradient is orders of magnitude smaller.
"""

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import GraftConfig
from peft_graft.search import mean_loss, sensitivity_map, train_adapter
from peft_graft.testing.assets import tokenize_blocks


RECIPE = dict(r=16, phi="dense", projection="svd", scaling=1.0)


@pytest.mark.slow
def test_projected_score_separates_paying_from_idle_modules(smollm2_dir, news_corpus, record_property):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    train = tokenize_blocks(news_corpus["train"], tokenizer, 64, max_blocks=20)
    held_out = tokenize_blocks(news_corpus["validation"], tokenizer, 64, max_blocks=8)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    smap = sensitivity_map(base, train[:4], GraftConfig(**RECIPE), progress=False)
    assert len(smap.modules) == 30 * 7
    ranked = smap.ranked("projected")
    top, bottom = ranked[0], ranked[-1]
    assert top.projected > 10 * bottom.projected

    before = mean_loss(base, held_out, [])
    gains = {}
    for module in (top, bottom):
        model = get_peft_model(base, GraftConfig(target_modules=[module.name], **RECIPE), adapter_name="probe")
        train_adapter(model, "probe", train[4:], steps=3, lr=1e-2, batch_size=4)
        gains[module.name] = before - mean_loss(model, held_out, ["probe"])
        base = model.unload()
    record_property("gains", {name: round(gain, 4) for name, gain in gains.items()})
    assert gains[top.name] > 0
    assert gains[top.name] > gains[bottom.name]
