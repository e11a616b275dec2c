"""Fingerprints of base models and data: equal content, equal hash; any change, a different hash."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from peft import get_peft_model

import peft_graft
from peft_graft.registry import FingerprintError, base_model_fingerprint, dataset_fingerprint


def test_base_fingerprint_is_reproducible_and_sees_every_weight_change(tiny_llama):
    model = tiny_llama()
    reference = base_model_fingerprint(model)
    assert base_model_fingerprint(tiny_llama()) == reference
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    assert base_model_fingerprint(model) != reference
    assert base_model_fingerprint(tiny_llama().to(torch.bfloat16)) != reference


def test_base_fingerprint_ignores_unmerged_adapters_but_not_merged_ones(tiny_llama):
    reference = base_model_fingerprint(tiny_llama())
    peft_model = get_peft_model(tiny_llama(), peft_graft.GraftConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "graft_" in name and param.requires_grad:
                param.add_(0.5)

    assert base_model_fingerprint(peft_model) == reference
    assert base_model_fingerprint(peft_model.get_base_model()) == reference
    peft_model.merge_adapter()
    with pytest.warns(UserWarning, match="merged"):
        assert base_model_fingerprint(peft_model) != reference


def test_base_fingerprint_refuses_meta_weights(tiny_llama):
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(FingerprintError, match="meta"):
        base_model_fingerprint(model)


def _dataset(rows: int = 3000) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "text": [f"line {i} ✓" for i in range(rows)],
            "input_ids": [list(range(i % 7)) for i in range(rows)],
            "label": [i % 2 for i in range(rows)],
            "score": [None if i % 11 == 0 else i / 3 for i in range(rows)],
        }
    )


def test_dataset_fingerprint_depends_on_content_and_order_only():
    ds = _dataset()
    reference = dataset_fingerprint(ds)
    rebuilt = datasets.Dataset.from_list(ds.to_list())  # same content, different Arrow layout and cache identity
    assert dataset_fingerprint(rebuilt) == reference
    assert dataset_fingerprint(ds.select(range(len(ds)))) == reference
    assert dataset_fingerprint(ds.select(range(1, len(ds)))) != reference
    assert dataset_fingerprint(ds.shuffle(seed=0)) != reference
    assert dataset_fingerprint(ds.map(lambda r: {"label": 1 - r["label"]})) != reference
    assert dataset_fingerprint(ds.rename_column("label", "labels")) != reference
    assert dataset_fingerprint(ds.cast_column("label", datasets.Value("int32"))) != reference
    assert dataset_fingerprint(datasets.DatasetDict(train=ds)) == dataset_fingerprint({"train": ds})


@pytest.mark.parametrize(
    "a,b",
    [
        (torch.arange(6), torch.arange(6).to(torch.int32)),  # dtype counts
        (torch.arange(6), torch.arange(6).reshape(2, 3)),  # shape counts
        (["a", "b"], ["ab"]),  # boundaries between strings count
        ([1, 2], ["1", "2"]),
        ([[1, 2], [3]], [[1], [2, 3]]),
        (np.arange(4), torch.arange(4)),
    ],
)
def test_different_data_gives_different_fingerprints(a, b):
    assert dataset_fingerprint(a) != dataset_fingerprint(b)


def test_equal_data_in_equivalent_containers():
    assert dataset_fingerprint(torch.arange(6).reshape(2, 3).t()) == dataset_fingerprint(
        torch.tensor([[0, 3], [1, 4], [2, 5]])
    )  # non-contiguous view
    assert dataset_fingerprint(["x", "y"]) == dataset_fingerprint(("x", "y"))
    assert dataset_fingerprint([torch.ones(2), torch.zeros(1)]) == dataset_fingerprint([torch.ones(2), torch.zeros(1)])


@pytest.mark.parametrize("data", [object(), {1: "a"}, np.array([object()])])
def test_unsupported_data_is_refused(data):
    with pytest.raises(FingerprintError):
        dataset_fingerprint(data)


def test_streaming_dataset_is_refused():
    with pytest.raises(FingerprintError, match="materialise"):
        dataset_fingerprint(_dataset(10).to_iterable_dataset())
