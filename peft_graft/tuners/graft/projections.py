"""Projections A (out×r) and B (r×d) of a graft, and how each kind is built.

``d`` is the size of the graft's input: ``in_features`` in additive mode, ``out_features`` in output mode.
Frozen projections are buffers, trainable ones parameters. Seeded orthogonal projections are regenerated from
(seed, module name) on load; a short fingerprint of the regenerated matrices is saved and checked, so a torch build
that generates different numbers fails loudly instead of silently loading a different adapter.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ...errors import ProjectionMismatchError, ShapeMismatchError


def derived_seed(seed: int, module_name: str) -> int:
    """A per-module seed, stable across processes and machines (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fingerprint(*tensors: torch.Tensor) -> int:
    """First 8 bytes of the sha256 of the fp32 values, as a signed 64-bit integer."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular vector pairs so the largest-magnitude entry of each column of U is positive.

    SVD is unique only up to the sign of each pair; fixing it makes two runs (and two LAPACKs) agree.
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, V * signs


def seeded_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows×cols matrix with orthonormal columns, generated on the CPU in float64 for reproducibility."""
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).to(torch.float32)


def orthogonal_projections(out_dim: int, d: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = seeded_orthonormal(out_dim, r, generator)
    B = seeded_orthonormal(d, r, generator).T.contiguous()
    return A, B


def svd_projections(weight: torch.Tensor, r: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal subspace of W (out×in): A = U_r, and B = V_rᵀ (additive) or U_rᵀ (output mode)."""
    U, _, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    U, V = canonical_signs(U[:, :r], Vh[:r].T)
    A = U.contiguous()
    B = (U if mode == "output" else V).T.contiguous()
    return A, B


def top_eigenvectors(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors (columns) of a symmetric PSD matrix, sign-canonicalised."""
    _, vecs = torch.linalg.eigh(gram.double())
    top = vecs[:, -r:].flip(-1).float()
    top, _ = canonical_signs(top, top)
    return top


def activation_projections(input_gram: torch.Tensor, output_gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B spans the top-r directions of the graft's inputs, A those of the layer's outputs."""
    return top_eigenvectors(output_gram, r).contiguous(), top_eigenvectors(input_gram, r).T.contiguous()


def gradient_projections(weight_grad: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r singular directions of the accumulated weight gradient: the subspace where a step gains most."""
    U, _, Vh = torch.linalg.svd(weight_grad.double(), full_matrices=False)
    U, V = canonical_signs(U[:, :r], Vh[:r].T)
    return U.float().contiguous(), V.float().T.contiguous()


class GraftProjection(nn.Module):
    """Holds A, B and the metadata needed to verify them on load.

    ``signature`` = [out, in, fingerprint of A and B] (int64) is always saved: loading onto a base with other shapes
    names the module and both shapes, and regenerated (not stored) projections must match the fingerprint. One
    small tensor rather than two keeps the safetensors header, which dominates tiny artifacts, short.
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        base_shape: tuple[int, int],
        trainable: bool,
        stored: bool,
    ) -> None:
        super().__init__()
        self.trainable = trainable
        self.stored = stored
        if trainable:
            self.A = nn.Parameter(A)
            self.B = nn.Parameter(B)
        else:
            self.register_buffer("A", A, persistent=stored)
            self.register_buffer("B", B, persistent=stored)
        self.register_buffer("signature", torch.tensor([*base_shape, fingerprint(A, B)], dtype=torch.int64))
        self._register_load_state_dict_pre_hook(self._verify_incoming, with_module=False)

    @torch.no_grad()
    def assign(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replace A and B (after calibration) keeping device, dtype and trainability."""
        self.A.copy_(A)
        self.B.copy_(B)
        self.signature[2] = fingerprint(A, B)

    def _verify_incoming(self, state_dict: dict, prefix: str, *args) -> None:
        incoming = state_dict.get(prefix + "signature")
        if incoming is None:
            return
        module = prefix.removeprefix("base_model.model.").rpartition(".graft_proj.")[0]
        incoming, own = incoming.cpu().tolist(), self.signature.cpu().tolist()
        if incoming[:2] != own[:2]:
            raise ShapeMismatchError(
                f"The adapter was trained on a base whose module {module!r} has weight shape {tuple(incoming[:2])} "
                f"(out, in), but this base has {tuple(own[:2])}. Load the adapter onto the base model it was trained "
                "for (see base_model_name_or_path in adapter_config.json)."
            )
        if not self.stored and incoming[2] != own[2]:
            raise ProjectionMismatchError(
                f"The seeded projections regenerated for {module!r} differ from those the adapter was trained with "
                f"(fingerprint {incoming[2]:#x} saved, {own[2]:#x} now). This happens when the torch build generates "
                "different random numbers or the seed/module names changed. Load it with the torch version it was "
                "trained with, or retrain with save_projection=True."
            )
