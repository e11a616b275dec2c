"""Projections A (out×r) and B (r×d) of a graft, and how each kind is built.

``d`` is the size of the graft's input: ``in_features`` in additive mode, ``out_features`` in output mode.
Frozen projections are buffers, trainable ones parameters. Seeded orthogonal projections are regenerated from
(seed, module name) on load; a short fingerprint of the regenerated matrices is saved and checked, so a torch build
that generates different numbers fails loudly instead of silently loading a different adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

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


# ------------------------------------------------------------------ top-r subspaces
#
# A full SVD (or eigh) costs O(m·n·min(m, n)) and takes minutes on a large module; the top r directions alone come from
# a randomized block Krylov iteration (Halko, Martinsson & Tropp 2011; Musco & Musco 2015) in O(m·n·b·niter) with
# b = r + oversample. Plain subspace iteration (torch.svd_lowrank, PEFT's PiSSA) keeps only the last block; on the
# flat spectra of trained LLM weights (SmolLM2's MLP: σ₇₀ ≈ 0.75·σ₁) it then captures ~90% of the top-r energy after
# 4 iterations. Keeping every block (a Krylov space of (niter+1)·b dimensions) and a Rayleigh-Ritz step captures
# ≥ 99.9% with the defaults (benchmarks/results/projection_accuracy.md).
#
# What the time goes into (benchmarks/results/graft_init.md): the products with W, which run at a few times the speed
# in bf16 where the hardware has bf16 matrix units (their rounding, 2⁻⁹ relative, is far below the solver's own
# error: the captured energy changes by ~2e-5) and 1.2-1.5× faster per column in blocks of 32 than of 16; and, on
# small modules, the orthonormalisation and the Ritz step, which therefore work in the smaller of W's two spaces and
# take the eigenvectors of a small Gram matrix instead of an SVD (an SVD of the 224×1536 Ritz matrix took 30 ms).


def product_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the solver multiplies ``weight`` in: bf16 where that is native or fast, fp32 otherwise.

    A bf16 weight stays bf16 (no fp32 copy of a large module). An fp32 or fp16 weight is multiplied in bf16 on a GPU
    and on CPUs with bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 products are emulated slowly, so they
    stay fp32 (fp16 is slow on CPUs too). Either way the result is deterministic on a given machine.
    """
    if weight.dtype == torch.bfloat16:
        return torch.bfloat16
    if weight.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if weight.device.type == "cpu" and _cpu_has_bf16_units():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16_units() -> bool:
    """torch's own CPU feature probes (private, hence looked up defensively: absent means no)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def _orthonormalize(Y: torch.Tensor, basis: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning the part of Y outside span(basis) (basis: orthonormal columns or None).

    Projecting out twice ("twice is enough") keeps the new columns orthogonal to the basis to working precision,
    unless a column held nothing but rounding noise: once the Krylov space has exhausted the matrix's range (a
    low-rank gradient from a few calibration tokens, a rank-deficient weight) what is left of it after the
    projections is noise, which lies largely inside the span. QR's diagonal shows such columns (what a column adds
    to the span is tiny next to its length); they are replaced by fresh random directions, as block Lanczos does on
    breakdown: any orthonormal extension of the basis is valid for the Rayleigh-Ritz step.
    """
    tolerance = torch.finfo(Y.dtype).eps ** (1 / 3)  # leaves the new columns orthogonal to ~eps^(2/3)
    for _ in range(3):
        lengths = torch.linalg.vector_norm(Y, dim=0)
        for _ in range(2 if basis is not None else 0):
            Y = Y - basis @ (basis.T @ Y)
        Q, R = torch.linalg.qr(Y)
        lost = R.diagonal().abs() <= tolerance * lengths
        if not lost.any():
            break
        Y = Q.clone()
        Y[:, lost] = _sketch(Y.shape[0], int(lost.sum()), generator, Y.dtype, Y.device)
    return Q


def _block_krylov(
    start: torch.Tensor, step: Callable, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Orthonormal basis [Q₀ … Q_niter] of the block Krylov space of ``start`` under ``step``.

    ``step(Q)`` returns (the next unorthogonalised block, a by-product the Rayleigh-Ritz step reuses so that no
    product with the matrix is computed twice); the by-products of Q₀ … Q_{niter-1} are returned in order.
    """
    Q = basis = _orthonormalize(start, None, generator)
    products = []
    for _ in range(niter):
        Y, product = step(Q)
        products.append(product)
        Q = _orthonormalize(Y, basis, generator)
        basis = torch.cat([basis, Q], dim=1)
    return basis, products


def _sketch(
    rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A Gaussian block, drawn on the CPU (the same numbers on every device) and moved to ``device``."""
    return torch.randn(rows, cols, generator=generator, dtype=dtype).to(device)


def _krylov_fits(block: int, niter: int | None, size: int) -> bool:
    """Whether the randomized path applies: a Krylov space smaller than the matrix (else the exact one is cheaper)."""
    return niter is not None and block * (niter + 1) < size


def _top_eigh(gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r eigenvalues (descending) and eigenvectors of a small symmetric matrix."""
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    return values[-r:].flip(-1), vectors[:, -r:].flip(-1)


def _right_vectors(scaled: torch.Tensor) -> torch.Tensor:
    """V from V·Σ = Wᵀ U: its columns, normalised (orthonormal completion where σ ≈ 0, as QR gives it)."""
    V, R = torch.linalg.qr(scaled)
    signs = torch.sign(R.diagonal())
    signs[signs == 0] = 1
    return V * signs


def top_singular_subspaces(
    matrix: torch.Tensor,
    r: int,
    niter: int | None,
    oversample: int,
    generator: torch.Generator,
    products: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """U_r (m×r) and V_r (n×r): the top-r left and right singular vectors of ``matrix`` (m×n), sign-canonicalised.

    ``niter=None`` runs the exact full SVD. A matrix too small for a Krylov space of (niter+1)·(r+oversample)
    dimensions gets the exact eigenvectors of its smaller Gram matrix. Otherwise 2·niter + 2 products with
    blocks of r+oversample columns, in the ``products`` dtype (default: ``matrix``'s), with everything else in fp32
    (fp64 for an fp64 matrix), on ``matrix``'s device; the same generator state gives the same result on the same
    machine.
    """
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    if niter is None:
        U, _, Vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
        return canonical_signs(U[:, :r], Vh[:r].T)
    wide = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T  # the basis lives in the smaller space
    if _krylov_fits(r + oversample, niter, wide.shape[0]):
        U, V = _randomized_subspaces(wide, r, niter, r + oversample, generator, products or matrix.dtype, dtype)
    else:
        small = wide.to(dtype)
        U = _top_eigh(small @ small.T, r)[1]
        V = _right_vectors(small.T @ U)
    return canonical_signs(U, V) if wide is matrix else canonical_signs(V, U)


def _randomized_subspaces(
    W: torch.Tensor,
    r: int,
    niter: int,
    block: int,
    generator: torch.Generator,
    products: torch.dtype,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r singular subspaces of W (m×n, m ≤ n) from its block Krylov space; products in ``products``.

    The Rayleigh-Ritz matrix basisᵀ W Wᵀ basis comes from the blocks W Wᵀ Qᵢ the iteration computes anyway, at
    m·k² rather than the n·k² of (Wᵀ basis)ᵀ(Wᵀ basis); V comes from one more product, Wᵀ U.
    """
    W = W.to(products)

    def step(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        WWtQ = _matmul(W, _matmul(W.T, Q.to(products))).to(dtype)
        return WWtQ, WWtQ

    start = _matmul(W, _sketch(W.shape[1], block, generator, dtype, W.device).to(products)).to(dtype)
    basis, blocks = _block_krylov(start, step, niter, generator)
    blocks.append(step(basis[:, -block:])[0])
    _, Ut = _top_eigh(basis.T @ torch.cat(blocks, dim=1), r)  # basisᵀ W Wᵀ basis = Ut S² Utᵀ
    U = basis @ Ut
    return U, _right_vectors(_matmul(W.T, U.to(products)).to(dtype))


def _matmul(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M @ X, as (Xᵀ Mᵀ)ᵀ when M is a transposed view: CPU bf16 kernels run a transposed left operand up to 1.6×
    slower (SmolLM2's 1536×576 MLP weights), and the products with W are either way round."""
    return M @ X if M.is_contiguous() else (X.T @ M.T).T


def top_eigenvectors(
    gram: torch.Tensor, r: int, niter: int | None, oversample: int, generator: torch.Generator
) -> torch.Tensor:
    """Top-r eigenvectors (d×r columns) of a symmetric PSD matrix, sign-canonicalised.

    ``niter=None`` (or a matrix too small for the Krylov space) runs the exact ``eigh`` in fp64. Otherwise niter + 2
    products with blocks of r+oversample columns, in ``gram``'s dtype on its device: a Gram XᵀX is already squared,
    so each product counts as a power iteration of the SVD of X.
    """
    block = r + oversample
    if not _krylov_fits(block, niter, gram.shape[0]):
        top = _top_eigh(gram.double(), r)[1].to(gram.dtype)
    else:

        def step(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            GQ = gram @ Q
            return GQ, GQ

        start = gram @ _sketch(gram.shape[0], block, generator, gram.dtype, gram.device)
        basis, products = _block_krylov(start, step, niter, generator)
        products.append(gram @ basis[:, -block:])
        ritz = basis.T @ torch.cat(products, dim=1)  # basisᵀ G basis
        top = basis @ _top_eigh(ritz.double(), r)[1].to(gram.dtype)
    top, _ = canonical_signs(top, top)
    return top


# A spectral norm needs only the top singular value, whose Ritz value converges much faster than the top-r subspace:
# 8 iterations with blocks of 16 meet every SmolLM2 projection's exact ‖W‖₂ to 6e-7 relative (random Gaussian
# matrices, whose top singular values crowd together, to 1e-3-3e-3 at 2048×8192-4096×11008), one thread, in a fifth
# of the time of the full SVD that torch.linalg.matrix_norm(ord=2) runs on a 576×1536 module, a thirty-seventh on a
# 2048×8192 one (0.32 s vs 11.9 s) and a seventieth on a 4096×11008 one (0.73 s vs 53.5 s).
_NORM_NITER, _NORM_BLOCK = 8, 16


def spectral_norm(matrix: torch.Tensor) -> float:
    """‖M‖₂ from a block Krylov space: ‖M v‖ for the top right Ritz vector v, so never above the exact norm (up to
    the rounding of a product in ``matrix``'s dtype: ~1e-3 relative in bf16).

    Why not ``torch.linalg.matrix_norm(ord=2)``: that is a full SVD, minutes on the 8192×28672 modules of a 70B base.
    Deterministic (a fixed sketch seed); products in `product_dtype`, the last one in ``matrix``'s dtype.
    """
    generator = torch.Generator().manual_seed(0)
    V = top_singular_subspaces(matrix, 1, _NORM_NITER, _NORM_BLOCK - 1, generator, product_dtype(matrix))[1]
    return torch.linalg.vector_norm((matrix @ V[:, 0].to(matrix.dtype)).float()).item()


def captured_energy(matrix: torch.Tensor, A: torch.Tensor, B: torch.Tensor, r: int) -> float:
    """‖Aᵀ W Bᵀ‖²_F / Σ_{i≤r} σᵢ²: the share of W's best rank-r energy that the graft space (A, B) sees (1 at the
    exact top-r subspaces, by Ky Fan's theorem never more). Exact SVD inside: for measuring, not for the hot path."""
    W = matrix.double()
    top = torch.linalg.svdvals(W)[:r].pow(2).sum()
    return ((A.double().T @ W @ B.double().T).pow(2).sum() / top).item()


def svd_projections(
    weight: torch.Tensor, r: int, mode: str, niter: int | None, oversample: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal subspace of W (out×in): A = U_r, and B = V_rᵀ (additive) or U_rᵀ (output mode), in fp32.

    Output mode needs only U; the sketch and iteration are the same. The products with W run in `product_dtype`;
    only a weight that must change dtype for them (or for the exact SVD) is copied, one module at a time.
    """
    U, V = top_singular_subspaces(weight.detach(), r, niter, oversample, generator, product_dtype(weight))
    return U.contiguous(), (U if mode == "output" else V).T.contiguous()


def activation_projections(
    input_gram: torch.Tensor,
    output_gram: torch.Tensor,
    r: int,
    niter: int | None,
    oversample: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B spans the top-r directions of the graft's inputs, A those of the layer's outputs."""
    A = top_eigenvectors(output_gram.float(), r, niter, oversample, generator)
    B = top_eigenvectors(input_gram.float(), r, niter, oversample, generator)
    return A.float().contiguous(), B.float().T.contiguous()


def gradient_projections(
    weight_grad: torch.Tensor, r: int, niter: int | None, oversample: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r singular directions of the accumulated weight gradient: the subspace where a step gains most.

    The exact path keeps fp64 (a gradient summed over many tokens spans a wide range); the randomized one runs in
    fp32, whose rounding is far below its own approximation error.
    """
    grad = weight_grad.double() if niter is None else weight_grad.float()
    U, V = top_singular_subspaces(grad, r, niter, oversample, generator)
    return U.float().contiguous(), V.float().T.contiguous()


class GraftProjection(nn.Module):
    """Holds A, B and the metadata needed to verify them on load.

    ``signature`` = [out, in, fingerprint of A and B] (int64) is always saved: loading onto a base with other shapes
    names the module and both shapes, and regenerated (not stored) projections must match the fingerprint. One
    small tensor rather than two keeps the safetensors header, which dominates tiny artifacts, short. A graft on a
    stack of E expert matrices has A (E, out, r), B (E, r, in) and the signature [E, out, in, fingerprint].
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        base_shape: tuple[int, ...],
        trainable: bool,
        stored: bool,
        empty_signature: bool = False,
    ) -> None:
        super().__init__()
        self.trainable = trainable
        self.stored = stored
        self.base_shape = base_shape
        own = None if A.is_meta else fingerprint(A, B)  # placeholders awaiting a file have none yet
        # Seeded projections are regenerated, never loaded: what a file's fingerprint must match.
        self.regenerated_fingerprint = None if stored else own
        if trainable:
            self.A = nn.Parameter(A)
            self.B = nn.Parameter(B)
        else:
            self.register_buffer("A", A, persistent=stored)
            self.register_buffer("B", B, persistent=stored)
        signature = (
            torch.empty(len(base_shape) + 1, dtype=torch.int64, device="meta")
            if empty_signature
            else torch.tensor([*base_shape, own], dtype=torch.int64)
        )
        self.register_buffer("signature", signature)
        self._register_load_state_dict_pre_hook(self._verify_incoming, with_module=False)

    def awaits_file(self) -> bool:
        """Whether some tensor is an empty (meta) placeholder that loading an adapter file will assign."""
        return any(t.is_meta for t in self._buffers.values())

    def _apply(self, fn: Callable, recurse: bool = True) -> GraftProjection:
        """Moves and casts pass over an adapter created empty for a file to fill (PEFT's ``low_cpu_mem_usage``): its
        meta placeholders hold no data to move, as PEFT skips adapter parameters on meta; once loaded, it moves."""
        return self if self.awaits_file() else super()._apply(fn, recurse)

    @torch.no_grad()
    def assign(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replace A and B (after calibration) keeping device, dtype and trainability."""
        self.A.copy_(A)
        self.B.copy_(B)
        self.signature[-1] = fingerprint(A, B)

    def _verify_incoming(self, state_dict: dict, prefix: str, *args) -> None:
        incoming = state_dict.get(prefix + "signature")
        if incoming is None:
            return
        module = prefix.removeprefix("base_model.model.").rpartition(".graft_proj.")[0]
        incoming = incoming.cpu().tolist()
        if incoming[:-1] != list(self.base_shape):
            layout = "(out, in)" if len(self.base_shape) == 2 else "(experts, out, in)"
            raise ShapeMismatchError(
                f"The adapter was trained on a base whose module {module!r} has weight shape {tuple(incoming[:-1])} "
                f"{layout}, but this base has {tuple(self.base_shape)}. Load the adapter onto the base model it was "
                "trained for (see base_model_name_or_path in adapter_config.json)."
            )
        if not self.stored and incoming[-1] != self.regenerated_fingerprint:
            raise ProjectionMismatchError(
                f"The seeded projections regenerated for {module!r} differ from those the adapter was trained with "
                f"(fingerprint {incoming[-1]:#x} saved, {self.regenerated_fingerprint:#x} now). This happens when "
                "the torch build generates different random numbers or the seed/module names changed. Load it with the torch version it was "
                "trained with, or retrain with save_projection=True."
            )
