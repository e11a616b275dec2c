"""``trainable_token_indices`` and ``ensure_weight_tying``: embedding rows, or a whole embedding copy, that train
with the grafts (PEFT's trainable tokens and weight tying, as in LoRA).

A user who adds special tokens trains their rows and the grafts, and saves only those rows; the adapter reloads,
merges and mixes batches like any other, a tied output embedding follows the input one, and indices that the model
cannot hold (or tied layers given different rows under ``ensure_weight_tying``) are refused before anything is
grafted.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import LLAMA_SIZES, tiny_llama

from peft_graft import GraftConfig
from peft_graft.errors import AdapterContentError, GraftConfigError
from peft_graft.tuners.graft.layer import GraftLayer


TOKENS = [0, 3, 5]
IDS = torch.tensor([[3, 5, 7, 9], [0, 5, 1, 2]])  # rows with and without trained tokens


def config(**overrides) -> GraftConfig:
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKENS, task_type="CAUSAL_LM")
    return GraftConfig(**(kwargs | overrides))


def trained(tie: bool, seed: int = 0) -> PeftModel:
    """A grafted model after three optimizer steps, so both the grafts and the token rows have moved."""
    model = get_peft_model(tiny_llama(tie_word_embeddings=tie), config(seed=seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)  # no decay
    torch.manual_seed(seed)
    for _ in range(3):
        batch = torch.randint(max(TOKENS) + 1, LLAMA_SIZES["vocab_size"], (2, 8))
        batch[:, ::3] = TOKENS[1]  # of the trained tokens, the batches use only this one
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def test_only_the_listed_rows_and_the_grafts_train() -> None:
    base_rows = tiny_llama().model.embed_tokens.weight.detach().clone()
    model = trained(tie=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in names) and any("graft_phi" in n for n in names)
    assert all("trainable_tokens_delta" in n or "graft_" in n for n in names)
    merged = model.merge_and_unload().model.embed_tokens.weight
    changed = (merged - base_rows).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == [3]  # the token the batches used; 0 and 5 got no gradient
    assert not any(isinstance(m, GraftLayer) for m in model.modules())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_reload_and_merge_reproduce_the_trained_model(tie: bool, tmp_path) -> None:
    model = trained(tie)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_llama(tie_word_embeddings=tie)), atol=1e-4)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    rows = [t for k, t in saved.items() if k.endswith("trainable_tokens_delta")]
    assert [tuple(t.shape) for t in rows] == [(len(TOKENS), LLAMA_SIZES["hidden_size"])]  # only these rows

    reloaded = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tie), tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    if tie:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_mixed_batches_and_disabled_adapters() -> None:
    model = get_peft_model(tiny_llama(), config(init_weights=False), adapter_name="a")
    model.add_adapter("b", config(init_weights=False, seed=1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_()
    model.eval()
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = logits(model)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["b", "a"]).logits
    torch.testing.assert_close(mixed[0], alone["b"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], alone["a"][1], atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "indices,message",
    [
        ([1000], "token 1000 of 'model.embed_tokens', which has 128 rows"),
        ({"no_such_embedding": [1]}, "Target modules {.no_such_embedding.} not found in the base model"),
    ],
    ids=["past-the-end", "unknown-module"],
)
def test_indices_the_model_cannot_hold_are_refused_before_grafting(indices, message) -> None:
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(GraftConfigError, match=message):
        get_peft_model(base, config(trainable_token_indices=indices))
    assert not any(isinstance(m, GraftLayer) for m in base.modules())
    assert base.state_dict().keys() == before.keys()


def test_a_grafted_embedding_cannot_also_train_token_rows() -> None:
    base = tiny_llama()
    with pytest.raises(GraftConfigError, match="both name 'model.embed_tokens'"):
        get_peft_model(base, GraftConfig(r=4, target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]))
    assert not any(isinstance(m, GraftLayer) for m in base.modules())


@pytest.mark.parametrize("indices", [[-1], [], "3", [True], {"embed_tokens": 3}, {1: [2]}])
def test_malformed_indices_are_config_errors(indices) -> None:
    with pytest.raises(GraftConfigError, match="trainable_token_indices must be"):
        config(trainable_token_indices=indices)


def test_token_rows_in_a_file_whose_config_has_none_are_refused(tmp_path) -> None:
    trained(tie=False).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    values = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(values | {"trainable_token_indices": None}))
    with pytest.raises(AdapterContentError, match="trainable_tokens_delta"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_ensure_weight_tying_with_conflicting_indices_is_refused_before_grafting() -> None:
    base = tiny_llama(tie_word_embeddings=True)
    conflicting = {"embed_tokens": [1, 2], "lm_head": [1, 3]}
    with pytest.raises(GraftConfigError, match="different token indices.*embed_tokens: \\[1, 2\\], lm_head: \\[1, 3\\]"):
        get_peft_model(base, config(trainable_token_indices=conflicting, ensure_weight_tying=True))
    assert not any(isinstance(m, GraftLayer) for m in base.modules())


def test_modules_to_tie_without_the_embedding_in_modules_to_save_is_refused_before_grafting() -> None:
    """modules_to_tie is ensure_weight_tying's record; set by hand without the embedding's trained copy in
    modules_to_save, PEFT would fail half-way through adding the adapter."""
    base = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(GraftConfigError, match="modules_to_tie=\\['lm_head'\\].*leave modules_to_tie unset"):
        get_peft_model(base, config(trainable_token_indices=None, modules_to_tie=["lm_head"]))
    assert not any(isinstance(m, GraftLayer) for m in base.modules())


def test_ensure_weight_tying_shares_one_trained_embedding_copy(tmp_path) -> None:
    """modules_to_save=["embed_tokens"] on a tied model: lm_head uses the same trained copy, before and after a
    save, a reload and a merge (without ensure_weight_tying PEFT would give lm_head no share of the training)."""
    model = get_peft_model(
        tiny_llama(tie_word_embeddings=True),
        config(trainable_token_indices=None, modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    )
    assert model.peft_config["default"].modules_to_tie == {"lm_head"}
    embedding = model.base_model.model.model.embed_tokens.modules_to_save["default"]
    assert model.base_model.model.lm_head.modules_to_save["default"].weight is embedding.weight
    with torch.no_grad():
        embedding.weight.add_(torch.randn_like(embedding.weight))
    expected = logits(model.eval())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_tie"] == ["lm_head"]
    reloaded = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
