"""Print the true parameter count of every DRM preset: `python -m drm_transformer.sizes`.

Models are built on the meta device, so even "350m" costs no memory or init time.
"""

import torch

from .configuration_drm import DRM_PRESETS, DRMConfig
from .modeling_drm import DRMForCausalLM


def count_parameters(config: DRMConfig) -> int:
    """Parameters of a `DRMForCausalLM` built from `config` (tied embeddings counted once)."""
    with torch.device("meta"):
        model = DRMForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    header = f"{'preset':>6} {'params':>13} {'vocab':>6} {'d':>5} {'layers':>6} {'heads':>5} {'m':>3} {'mlp':>5}"
    print(header)
    print("-" * len(header))
    for name in DRM_PRESETS:
        c = DRMConfig.from_preset(name)
        print(
            f"{name:>6} {count_parameters(c):>13,} {c.vocab_size:>6} {c.hidden_size:>5} {c.num_hidden_layers:>6} "
            f"{c.num_attention_heads:>5} {c.manifold_dim:>3} {c.intermediate_size:>5}"
        )


if __name__ == "__main__":
    main()
