"""The README.md model card: PEFT metadata, metrics in model-index form, and the import note."""

from __future__ import annotations

from huggingface_hub import ModelCard

from peft_graft.hub import push_graft
from peft_graft.registry import adapter_content_id


def test_card_round_trips_model_index_metrics(local_hub, repo_id, save_graft, accepted_record, metrics):
    gate_evidence = {"retention": {"regression": 0.002, "verdict": "accept"}}  # nested, as the gates report it
    all_metrics = {**metrics, **gate_evidence}
    adapter = save_graft()
    push_graft(adapter, repo_id, metadata=accepted_record, metrics=all_metrics, base_model="org/tiny-base")

    card = ModelCard.load(repo_id)  # downloaded from the local Hub and parsed back
    numeric = {**metrics, "retention.regression": 0.002}  # the verdict string stays in graft_metadata.json only
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == numeric
    assert card.data.model_name == repo_id
    assert {"peft", "peft-graft", "graft"} <= set(card.data.tags)
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-base"
    assert "import peft_graft" in card.text and "KeyError: 'GRAFT'" in card.text
    assert adapter_content_id(adapter) in card.text and accepted_record["base_fingerprint"] in card.text


def test_card_states_the_gates_and_how_to_load_without_peft_graft(local_hub, repo_id, save_graft, accepted_record,
                                                                  metrics):
    from gate_evidence import accepting_evidence

    record = {**accepted_record, "evidence": accepting_evidence(gain=0.125)}
    push_graft(save_graft(), repo_id, metadata=record, metrics=metrics, base_model="org/tiny-base")
    text = ModelCard.load(repo_id).text
    assert "Decision: **ACCEPTED**" in text
    assert "| min_gain | ACCEPTED | gain above threshold | threshold=0.0 |" in text
    assert "--format peft-lora" in text and "--format gguf-lora" in text
