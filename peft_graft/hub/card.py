"""The README.md model card of a published graft: metadata header with metrics in model-index form, plus prose."""

from __future__ import annotations

from collections.abc import Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..model_cards import GRAFT_ADAPTER_TEMPLATE
from .record import numeric_metrics


CARD_TAGS = ("peft", "peft-graft", "graft")


def render_card(
    repo_id: str,
    record: Mapping,
    *,
    task_type: str = "text-generation",
    eval_dataset: str = "acceptance-set",
) -> ModelCard:
    """Card for ``record`` (see `build_record`); each numeric metric becomes one model-index `EvalResult`."""
    metrics = numeric_metrics(record["metrics"])
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=eval_dataset,
            dataset_name=eval_dataset,
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in metrics.items()
    ]
    base_model = record.get("base_model")
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        tags=list(CARD_TAGS),
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(GRAFT_ADAPTER_TEMPLATE),
        repo_id=repo_id,
        base_model=base_model,
        metrics=metrics,
        record=record,
        eval_dataset=eval_dataset,
    )
