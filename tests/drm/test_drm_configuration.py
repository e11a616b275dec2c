"""DRMConfig: invalid shapes fail at config time (transformers' `@strict` validation), presets have their sizes."""

import pytest
from drm_testing import tiny_config
from huggingface_hub.errors import StrictDataclassError

from drm_transformer import DRM_PRESETS, DRMConfig, sizes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=17), "divisible by num_attention_heads"),
        (dict(manifold_dim=0), "manifold_dim must be >= 1"),
        (dict(manifold_dim=3), "must be even"),
        (dict(use_manifold_projection=False, hidden_size=18), "must be even"),
        (dict(num_attention_heads=0), "field 'num_attention_heads'(.|\n)*greater or equal to 1"),
        (dict(vocab_size=0), "field 'vocab_size'(.|\n)*greater or equal to 1"),
        (dict(metric_rank=0), "metric_rank"),
        (dict(gamma_eps=0.0), "field 'gamma_eps'(.|\n)*greater than 0"),
    ],
)
def test_invalid_config_raises_strict_validation_error(overrides: dict, message: str) -> None:
    # As for transformers' own configs, `@strict` wraps the validators' ValueErrors in its own error type.
    with pytest.raises(StrictDataclassError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(manifold_dim=0, use_manifold_projection=False),
        dict(manifold_dim=3, use_rope=False),
        dict(metric_rank=0, use_metric=False),
    ],
)
def test_switched_off_component_is_not_validated(overrides: dict) -> None:
    tiny_config(**overrides)


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="Unknown DRM preset"):
        DRMConfig.from_preset("7b")


def test_preset_overrides_win() -> None:
    config = DRMConfig.from_preset("5m", vocab_size=4096)
    assert (config.vocab_size, config.hidden_size, config.manifold_dim) == (4096, 96, 6)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("1m", 997_824), ("5m", 5_628_048), ("125m", 126_886_416), ("350m", 351_183_872)],
)
def test_preset_parameter_counts(name: str, expected: int) -> None:
    assert name in DRM_PRESETS
    assert sizes.count_parameters(DRMConfig.from_preset(name)) == expected


def test_config_round_trip(tmp_path) -> None:
    config = tiny_config(use_gravity=False, manifold_dim=6)
    config.save_pretrained(tmp_path)
    loaded = DRMConfig.from_pretrained(tmp_path)
    assert (loaded.use_gravity, loaded.manifold_dim, loaded.model_type) == (False, 6, "drm")


def test_sizes_command_prints_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    sizes.main()
    out = capsys.readouterr().out
    assert all(f"{count:,}" in out for count in (997_824, 5_628_048, 126_886_416, 351_183_872))
