"""The benchmark's targets, judged PASS / MISS (N/A while results are missing) from the report's rows.

targets.json declares each target: its title, its kind (one of KINDS below), the methods it refers to by folder
name ("reference", "subject") or by a filter on their adapter config and training options ("candidates"), and its
thresholds. The kinds hold only the comparison and the wording of the evidence.

The three speed kinds judge one subject: among the candidates at the reference's own target modules, the best test
gain, preferring those within max_params_ratio of the reference's trainable params, so that speed is compared at the
same modules as the reference and on the graft the gain target would pick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .experiments import Experiment
from .protocol import t_interval


TARGETS_FILE = Path(__file__).resolve().parent / "targets.json"
Verdict = tuple[bool | None, str, str | None]  # (passed, evidence, subject to name in the title)


class Context:
    """One target's view of the rows: its reference, candidates and thresholds."""

    def __init__(self, target: dict, rows: dict[str, dict], experiments: dict[str, Experiment]) -> None:
        self.target, self.rows, self.experiments = target, rows, experiments
        self.ref = rows.get(target["reference"])
        where = target.get("candidates")
        self.candidates = [] if where is None else [row for name, row in rows.items()
                                                    if experiments[name].matches(where)]

    @property
    def ref_label(self) -> str:
        return self.experiments[self.target["reference"]].label

    def within_budget(self, row: dict) -> bool:
        return row["trainable_params"] <= self.target["max_params_ratio"] * self.ref["trainable_params"]

    def speed_subject(self) -> dict | None:
        if self.ref is None:
            return None
        ref_modules = self.experiments[self.target["reference"]].target_modules
        same = [r for r in self.candidates if self.experiments[r["method"]].target_modules == ref_modules]
        small = [r for r in same if self.within_budget(r)]
        return max(small or same, key=lambda r: r["gain_mean"]) if same else None

    def listing(self, key: str, suffix: str = "") -> str:
        """Every candidate's ``key`` (a ratio), for the evidence."""
        values = ", ".join(f"{r['method']} {r[key]:.2f}x" for r in self.candidates)
        return f"all {self.target['candidates_label']}{suffix}: {values}"

    def missing(self) -> Verdict:
        needs = [self.target[k] for k in ("reference", "subject") if k in self.target]
        needs += ["a candidate"] if "candidates" in self.target else []
        return None, "needs results of " + " and ".join(needs), None


def gain_within_budget(c: Context) -> Verdict:
    small = [r for r in c.candidates if c.ref and c.within_budget(r)]
    if not small:
        return c.missing()
    head, ref = max(small, key=lambda r: r["gain_mean"]), c.ref
    diff, ci = t_interval([a - b for a, b in zip(head["test_gains"], ref["test_gains"], strict=True)])
    return head["gain_mean"] >= ref["gain_mean"], (
        f"best such graft {head['method']} ({head['trainable_params']:,} params, "
        f"{head['trainable_params'] / ref['trainable_params']:.3f}x): gain {head['gain_mean']:.4f} ± "
        f"{head['gain_ci95']:.4f} vs {c.ref_label} {ref['gain_mean']:.4f} ± {ref['gain_ci95']:.4f}; paired difference "
        f"{diff:+.4f} ± {ci:.4f} nats"), None


def artifact_bytes(c: Context) -> Verdict:
    if not (c.ref and c.candidates):
        return c.missing()
    ratio = {r["method"]: r["adapter_bytes"] / c.ref["adapter_bytes"] for r in c.candidates}
    smallest = min(c.candidates, key=lambda r: r["adapter_bytes"])
    evidence = "; ".join(f"{r['method']}: {r['adapter_bytes']:,} B = 1/{1 / ratio[r['method']]:.0f} (tensors alone "
                         f"{r['adapter_tensor_bytes']:,} B, the rest is the safetensors header)" for r in c.candidates)
    return ratio[smallest["method"]] <= c.target["max_ratio"], (
        f"{evidence}; {c.ref_label}: {c.ref['adapter_bytes']:,} B"), None


def step_time(c: Context) -> Verdict:
    if (s := c.speed_subject()) is None:
        return c.missing()
    return s["step_ratio_to_ref"] <= c.target["max_ratio"], (
        f"{s['step_ms']:.0f} ms = {s['step_ratio_to_ref']:.3f}x; {c.listing('step_ratio_to_ref')}"), s["method"]


def unmerged_latency(c: Context) -> Verdict:
    if (s := c.speed_subject()) is None:
        return c.missing()
    return s["latency_unmerged_over_ref"] <= c.target["max_ratio"], (
        f"{s['latency_unmerged_over_ref']:.3f}x {c.ref_label}, {s['latency_unmerged_over_base']:.3f}x base; "
        f"{c.listing('latency_unmerged_over_ref', f' vs {c.ref_label}')}"), s["method"]


def merged_latency(c: Context) -> Verdict:
    if (s := c.speed_subject()) is None:
        return c.missing()
    return s["latency_merged_over_base"] <= c.target["max_ratio"], (
        f"{s['latency_merged_over_base']:.3f}x base after merge_and_unload(); max |Δlogit| merged vs unmerged "
        f"{s['merged_max_abs_dlogit']:.1e}"), s["method"]


def gain_vs_peers(c: Context) -> Verdict:
    """The best peer's gain (the strongest LoRA variant) reached by a graft inside every budget at once: trainable
    params, total compute (init + training, measured in the probe) and step time, each against the reference."""
    t = c.target
    peers = [row for name, row in c.rows.items() if c.experiments[name].matches(t["peers"])]
    small = [r for r in c.candidates if c.ref and c.within_budget(r)]
    if not (peers and small):
        return c.missing()
    best_peer = max(peers, key=lambda r: r["gain_mean"])

    def fits(r: dict) -> bool:
        return r["compute_ratio_to_ref"] <= t["max_compute_ratio"] and r["step_ratio_to_ref"] <= t["max_step_ratio"]

    head = max([r for r in small if fits(r)] or small, key=lambda r: r["gain_mean"])
    listing = ", ".join(f"{r['method']} {r['gain_mean']:+.3f} at {r['compute_ratio_to_ref']:.2f}x compute, "
                        f"{r['step_ratio_to_ref']:.2f}x step" for r in small)
    return fits(head) and head["gain_mean"] >= best_peer["gain_mean"], (
        f"best peer {best_peer['method']} gains {best_peer['gain_mean']:.4f} ± {best_peer['gain_ci95']:.4f}; "
        f"best graft {'within every budget' if fits(head) else 'within the params budget (none fits them all)'}: "
        f"{head['method']}; grafts within the params budget: {listing}"), head["method"]


def peak_memory(c: Context) -> Verdict:
    s, ref = c.rows.get(c.target["subject"]), c.ref
    if not (s and ref):
        return c.missing()
    return s["peak_tensor_mib"] <= ref["peak_tensor_mib"], (
        f"peak tensor memory {s['peak_tensor_mib']:.1f} MiB vs {ref['peak_tensor_mib']:.1f} MiB; peak RSS "
        f"{s['peak_rss_mib']:.0f} vs {ref['peak_rss_mib']:.0f} MiB (training increase "
        f"{s['train_rss_increase_mib']:.0f} vs {ref['train_rss_increase_mib']:.0f} MiB)"), None


KINDS: dict[str, Callable[[Context], Verdict]] = {
    f.__name__: f for f in (
        gain_within_budget, gain_vs_peers, artifact_bytes, step_time, unmerged_latency, merged_latency, peak_memory
    )
}


def load_targets(path: Path = TARGETS_FILE) -> list[dict]:
    return json.loads(path.read_text())


def judge(targets: list[dict], rows: dict[str, dict], experiments: dict[str, Experiment]) -> list[dict]:
    """One verdict per target: {"target": title (with the judged method), "status": PASS/MISS/N/A, "detail"}."""
    verdicts = []
    for target in targets:
        passed, detail, subject = KINDS[target["kind"]](Context(target, rows, experiments))
        verdicts.append(dict(
            target=target["title"] + (f" ({subject})" if subject else ""),
            status="N/A" if passed is None else "PASS" if passed else "MISS", detail=detail,
        ))
    return verdicts
