"""`peft-graft estimate`'s table: one column per adapter method, rows from the base to the total."""

from __future__ import annotations

from .estimate import GIB, GPU_RESERVE, MemoryEstimate


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:,.2f} GiB"


def estimate_lines(estimate: MemoryEstimate) -> list[str]:
    """The human-readable plan: base in every format, then each adapter's memory side by side."""
    e = estimate
    storage = e.quant + (" (double quant)" if e.double_quant and e.quant == "nf4" else "")
    lines = [
        f"{e.source} ({e.model_type}, {e.architecture}, {e.num_layers} layers): {e.base_params:,} parameters",
        "Base weights: " + ", ".join(f"{q} {_gib(n)}" for q, n in e.base_bytes.items()),
        (
            f"Plan: base in {storage} (compute {e.compute_dtype}), batch {e.batch} × {e.seq_len} tokens, "
            f"{e.attention} attention, gradient checkpointing {'on' if e.checkpointing else 'off'}, AdamW"
        ),
        "",
    ]
    rows = [("", *(a.label for a in e.adapters))]
    rows.append(("modules adapted", *(f"{a.modules:,}" for a in e.adapters)))
    rows.append(("trainable params", *(f"{a.trainable_params:,}" for a in e.adapters)))
    rows.append(("adapter file (tensor data)", *(f"{a.file_bytes:,} B" for a in e.adapters)))
    rows.append((f"base weights ({storage})", *(_gib(e.base_bytes[e.quant]) for _ in e.adapters)))
    rows.append(("adapter weights in memory", *(_gib(a.weights_bytes) for a in e.adapters)))
    rows.append(("gradients", *(_gib(a.gradient_bytes) for a in e.adapters)))
    rows.append(("optimizer state (AdamW)", *(_gib(a.optimizer_bytes) for a in e.adapters)))
    acts = [a.activations for a in e.adapters]
    rows.append(("activations saved", *(_gib(x and x.saved) for x in acts)))
    rows.append(("activations peak (backward)", *(_gib(x and x.peak) for x in acts)))
    rows.append(("total", *(_gib(e.total_bytes(a)) if a.activations else "-" for a in e.adapters)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  "
        + "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    if e.activation_note:
        lines.append(f"  ({e.activation_note})")
    if e.gpu_memory_gib is not None:
        lines.append("")
        for a in e.adapters:
            fits = e.fits(a)
            verdict = "unknown" if fits is None else "yes" if fits else "no"
            lines.append(
                f"fits a {e.gpu_memory_gib:g} GB GPU with {a.label}: {verdict} "
                f"(needs {_gib(e.total_bytes(a))} + {_gib(GPU_RESERVE)} reserve)"
            )
    return lines
