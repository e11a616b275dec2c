"""Mixed adapter batches (``adapter_names=``): each row runs through its own graft, as with PEFT's LoRA.

Every check compares a mixed batch with the same rows run one adapter at a time, on every tiny architecture of the
table (GPT-2's Conv1D, BERT with its classifier in ``modules_to_save``, T5's encoder-decoder), in both graft modes,
and through ``generate`` with greedy and beam search.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import ARCHS, VOCAB, tiny_llama

from peft_graft import GraftConfig


# PEFT mixes batches through a modules_to_save copy only when it is a Linear/Embedding/Conv layer (LoRA shares the
# limit), so RoBERTa, whose classifier is a head module, is left out.
MIXABLE = {name: arch for name, arch in ARCHS.items() if name != "roberta"}

def grafted(arch, mode: str = "additive") -> torch.nn.Module:
    """Two trained-looking (non-identity) grafts, ``a`` and ``b``, with different seeds and Φ."""
    def config(seed: int) -> GraftConfig:
        return GraftConfig(
            r=4,
            target_modules=list(arch.explicit_targets),
            init_weights=False,
            seed=seed,
            mode=mode,
            **arch.peft_kwargs,
        )

    model = get_peft_model(arch.fresh(), config(1), adapter_name="a")
    model.add_adapter("b", config(2))
    if arch.peft_kwargs.get("modules_to_save"):  # give each adapter's classifier copy its own weights
        torch.manual_seed(5)
        for name, p in model.named_parameters():
            if "modules_to_save.b" in name:
                p.data.normal_()
    return model.eval()


def outputs(model: torch.nn.Module, batch: dict, adapter: str | None, **kwargs) -> torch.Tensor:
    """Logits with ``adapter`` active (None: the base model), or with ``adapter_names`` in ``kwargs``."""
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(**batch).logits
        if adapter != "mixed":
            model.set_adapter(adapter)
        return model(**batch, **kwargs).logits


@pytest.mark.parametrize("mode", ["additive", "output"])
@pytest.mark.parametrize("arch", MIXABLE.values(), ids=MIXABLE.keys())
def test_each_row_gets_its_own_adapter(arch, mode):
    model = grafted(arch, mode)
    batch = {k: v for k, v in arch.batch().items() if k != "labels"}
    if arch.kind == "seq2seq":
        batch["decoder_input_ids"] = arch.batch()["labels"]
    alone = {name: outputs(model, batch, name) for name in ("a", "b")}
    base = outputs(model, batch, None)
    assert not torch.allclose(alone["a"], alone["b"]) and not torch.allclose(alone["a"], base)
    for names in (["a", "b"], ["b", "a"], ["__base__", "b"], ["a", "__base__"]):
        mixed = outputs(model, batch, "mixed", adapter_names=names)
        for row, name in enumerate(names):
            expected = base if name == "__base__" else alone[name]
            torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-5)


def test_generate_with_mixed_batches_greedy_and_beam_search():
    model = grafted(ARCHS["llama"])
    prompts = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "a"]
    for beams in (1, 2):
        settings = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0)
        mixed = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names,
                               **settings)
        for row, name in enumerate(names):
            one = prompts[row : row + 1]
            kwargs = dict(input_ids=one, attention_mask=torch.ones_like(one), **settings)
            if name == "__base__":
                with model.disable_adapter():
                    expected = model.generate(**kwargs)
            else:
                model.set_adapter(name)
                expected = model.generate(**kwargs)
            assert torch.equal(mixed[row], expected[0]), (beams, name)


def test_encoder_decoder_beam_search_keeps_the_encoder_rows_unrepeated():
    model = grafted(ARCHS["t5"])
    inputs = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=3, do_sample=False, num_beams=3)
    mixed = model.generate(input_ids=inputs, adapter_names=["a", "b"], **settings)
    for row, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        expected = model.generate(input_ids=inputs[row : row + 1], **settings)
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0])


def test_bad_mixed_batches_raise_peft_errors():
    model = grafted(ARCHS["llama"])
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="non-existing adapter.*: c"):
        model(input_ids=ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(input_ids=ids, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.unmerge_adapter()
    assert model(input_ids=ids, adapter_names=["a", "b"]).logits.shape == (2, 6, VOCAB)


def test_an_adapter_on_some_layers_only_leaves_the_other_layers_alone():
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], init_weights=False), "a")
    model.add_adapter("b", GraftConfig(r=4, target_modules=["v_proj"], layers_to_transform=[0], init_weights=False))
    model.eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    mixed = outputs(model, {"input_ids": ids}, "mixed", adapter_names=["b", "a"])
    torch.testing.assert_close(mixed[0], outputs(model, {"input_ids": ids}, "b")[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], outputs(model, {"input_ids": ids}, "a")[1], atol=1e-5, rtol=1e-5)
