"""`peft-graft` command line: inspect and verify adapters, and manage a graft registry and its Hub copies.

Building the parser and `--help` import no model library: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GraftConfigError, PeftGraftError
from .status import GraftStatus


if TYPE_CHECKING:
    from .tuners.graft import GraftConfig


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")


def _done(report: dict, text: str, as_json: bool) -> None:
    """What an action command did: one sentence, or its JSON report."""
    print(json.dumps(report, indent=2, default=str) if as_json else text)


def _registry(root: str) -> Any:
    from .registry import GraftRegistry

    if not (Path(root) / "registry.sqlite").is_file():
        raise PeftGraftError(f"{root} is not a graft registry (no registry.sqlite); check the path.")
    return GraftRegistry(root)


def _resolve(registry: Any, prefix: str) -> str:
    """Full graft id from a unique prefix, as git does for commits."""
    matches = [r.graft_id for r in registry.list() if r.graft_id.startswith(prefix)]
    if not matches:
        raise PeftGraftError(f"No graft id in {registry.root} starts with {prefix!r}; `peft-graft list` shows them.")
    if len(matches) > 1:
        raise PeftGraftError(f"{prefix!r} matches {len(matches)} grafts in {registry.root}; give more characters.")
    return matches[0]


def _inspect(args: argparse.Namespace) -> int:
    from .artifacts import parse_config, verify_adapter

    summary = verify_adapter(args.path)
    config = parse_config(summary)
    _print(
        {
            "path": str(summary.path),
            "r": config.r,
            "phi": config.phi,
            "projection": config.projection,
            "mode": config.mode,
            "modules": len(summary.modules),
            "phi_params": summary.num_phi_params,
            "stores_projections": summary.stores_projections,
            "file_bytes": summary.file_bytes,
            "base_model": config.base_model_name_or_path,
        },
        args.json,
    )
    return 0


def _sewl_inspect(args: argparse.Namespace) -> int:
    from .sewl.report import report_lines, snapshot_report

    report = snapshot_report(args.path, args.log)
    print(json.dumps(report, indent=2, default=str) if args.json else "\n".join(report_lines(report)))
    return 0 if report["integrity"] is True else 1


def _read_head(path: str) -> tuple[int, str]:
    """A head written by `peft-graft head`."""
    try:
        head = json.loads(Path(path).read_text(encoding="utf-8"))
        return int(head["seq"]), str(head["hash"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PeftGraftError(f"{path} is not an audit head written by `peft-graft head` ({err}).") from err


def _head(args: argparse.Namespace) -> int:
    seq, digest = _registry(args.root).audit.head()
    print(json.dumps({"seq": seq, "hash": digest}))
    return 0


def _verify(args: argparse.Namespace) -> int:
    if (Path(args.path) / "registry.sqlite").is_file():
        if args.trusted_key:
            raise PeftGraftError(f"--trusted-key checks the graft.sig of an adapter folder; {args.path} is a registry.")
        expected = _read_head(args.expect_head) if args.expect_head else None
        count = _registry(args.path).verify(artifacts=True, expected_head=expected)
        report = {"ok": True, "registry": args.path, "audit_records": count}
        text = f"OK: registry {args.path}: audit chain of {count} records intact, tables and artifacts match it"
    else:
        from .artifacts import verify_adapter
        from .export import load_base

        summary = verify_adapter(args.path, base=load_base(args.path, args.base) if args.base else None)
        report = {"ok": True, "adapter": str(summary.path), "modules": len(summary.modules),
                  "file_bytes": summary.file_bytes, "loaded_onto": args.base}
        text = f"OK: {summary.path} ({len(summary.modules)} grafted modules, {summary.file_bytes:,} bytes)"
        if args.base:
            text += f", loads onto {args.base}"
        if args.trusted_key:
            from .signing import verify_graft_signature

            check = verify_graft_signature(args.path, args.trusted_key)
            report["signature"] = check.to_dict()
            text += f", signature verified against key sha256 {check.key_sha256[:12]}"
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


def _sign(args: argparse.Namespace) -> int:
    from .signing import SIGNATURE_NAME, sign_graft

    digest = sign_graft(args.path, args.key)
    signature = Path(args.path) / SIGNATURE_NAME
    report = {"signed": args.path, "signature": str(signature), "signature_sha256": digest}
    _done(report, f"signed {args.path}: {signature} (sha256 {digest})", args.json)
    return 0


def _list(args: argparse.Namespace) -> int:
    records = _registry(args.root).list(status=args.status)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, default=str))
        return 0
    for r in records:
        print(f"{r.graft_id[:12]}  {r.status.value:<12} {r.config.get('adapter_name', '?'):<16} {r.created_at}")
    return 0


def _show(args: argparse.Namespace) -> int:
    registry = _registry(args.root)
    graft_id = _resolve(registry, args.graft_id)
    report = registry.get(graft_id).to_dict()
    report["history"] = [
        {"from": h.from_status and h.from_status.value, "to": h.to_status.value, "reason": h.reason}
        for h in registry.history(graft_id)
    ]
    print(json.dumps(report, indent=2, default=str))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from .growth import rollback

    registry = _registry(args.root)
    graft_id = _resolve(registry, args.graft_id)
    rollback(registry, graft_id, reason=args.reason)
    _done({"rolled_back": graft_id}, f"rolled back {graft_id[:12]}: `compose` no longer loads it", args.json)
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .growth import compose, consolidate

    registry = _registry(args.root)
    model = compose(AutoModelForCausalLM.from_pretrained(args.base), registry)
    has_tokenizer = any((Path(args.base) / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(args.base) if has_tokenizer else None
    vocab = model.get_base_model().config.vocab_size
    probe = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    result = consolidate(model, registry, args.out, probe, atol=args.atol, tokenizer=tokenizer)
    _print({"path": result.path, "base_fingerprint": result.base_fingerprint, "max_drift": result.max_drift,
            "grafts": [g[:12] for g in result.graft_ids]}, args.json)
    return 0


def _push(args: argparse.Namespace) -> int:
    from .growth import HubTarget, push_accepted

    registry = _registry(args.root)
    graft_id = _resolve(registry, args.graft_id)
    commit = push_accepted(registry, graft_id, HubTarget(args.repo_id, endpoint=args.endpoint, token=args.token))
    report = {"pushed": graft_id, "repo_id": args.repo_id, "commit": commit}
    _done(report, f"pushed {graft_id[:12]} to {args.repo_id} (commit {commit})", args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_adapter

    out = export_adapter(args.path, args.out, format=args.format, base=args.base, outtype=args.outtype)
    _done({"exported": args.path, "format": args.format, "path": str(out)}, f"wrote {args.format} {out}", args.json)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .hub import pull_graft

    path = pull_graft(args.repo_id, args.local_dir, revision=args.revision, graft_id=args.graft_id,
                      trusted_key=args.trusted_key, endpoint=args.endpoint, token=args.token)
    _done({"pulled": args.repo_id, "path": str(path)}, f"pulled {args.repo_id} into {path} (hashes verified)", args.json)
    return 0


def _graft_config(args: argparse.Namespace) -> GraftConfig:
    """The GraftConfig to count: ``--config`` (an adapter_config.json or its folder), then the flags over it."""
    from .tuners.graft.integrity import config_from_dict, read_config

    values: dict[str, Any] = {}
    if args.config:
        if Path(args.config).is_dir():
            values = read_config(args.config).to_dict()
        else:
            try:
                values = json.loads(Path(args.config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise GraftConfigError(f"--config {args.config}: not a readable JSON GraftConfig ({err}).") from err
            if not isinstance(values, dict):
                raise GraftConfigError(f"--config {args.config} holds a JSON {type(values).__name__}, not an object.")
    flags = {
        "r": args.r,
        "phi": args.phi,
        "projection": args.projection,
        "target_modules": args.target_modules,
        "target_parameters": args.target_parameters,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values["inference_mode"] = False  # a saved adapter's config says True: count what training it trains
    return config_from_dict(values)


def _target_modules(value: str) -> str | list[str]:
    return value if value == "all-linear" else [name.strip() for name in value.split(",") if name.strip()]


def _inspect_base(args: argparse.Namespace) -> int:
    from .inspect_base import inspect_base, report_lines

    report = inspect_base(args.model_or_config, _graft_config(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print("\n".join(report_lines(report)))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from .planning import estimate_lines, estimate_memory, parse_graft_spec, resolve_config

    config = resolve_config(args.model_or_config, timeout=args.timeout)
    estimate = estimate_memory(
        config, parse_graft_spec(args.graft), lora_r=args.lora_r or None, quant=args.quant,
        compute_dtype=args.compute_dtype, double_quant=args.double_quant, batch=args.batch, seq_len=args.seq_len,
        attention=args.attention, checkpointing=args.gradient_checkpointing, gpu_memory_gib=args.gpu_memory,
        source=args.model_or_config,
    )
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else "\n".join(estimate_lines(estimate)))
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from .search.cli import sensitivity

    _print(sensitivity(args), args.json)
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search.cli import search

    _print(search(args), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-graft", description="Inspect graft adapters and manage a registry.")
    parser.add_argument("--version", action=_VersionAction, help="Show the versions of peft-graft and its libraries.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any, help: str, *positionals: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        for positional in positionals:
            p.add_argument(positional)
        p.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
        p.set_defaults(func=func)
        return p

    command("inspect", _inspect, "Summarise a saved graft adapter folder.", "path")
    command(
        "sewl-inspect",
        _sewl_inspect,
        "Summarise a SEWL snapshot, or a folder of per-user snapshots: rule, config, updates, bytes, integrity, last "
        "log entries (exit 1 if a file fails its sha256).",
        "path",
    ).add_argument("--log", type=int, default=5, metavar="N", help="Last update records to show.")
    base = command(
        "inspect-base", _inspect_base, "List what in a base model can take a graft, and what a GraftConfig adds, from "
        "its config alone (built on the meta device: no weights downloaded or loaded).", "model_or_config",
    )
    base.add_argument("--config", metavar="GRAFT_CONFIG_JSON", help="GraftConfig to count: an adapter_config.json or "
                      "a folder holding one (default: GraftConfig() with the model type's default targets).")
    base.add_argument("--r", type=int, help="Graft space size (overrides --config).")
    base.add_argument("--phi", help="Φ family: dense, diagonal, triangular, banded, lowrank or hadamard.")
    base.add_argument("--projection", help="svd, orthogonal, activation, gradient or trainable.")
    base.add_argument("--target-modules", type=_target_modules, metavar="A,B",
                      help="Comma-separated module names, or all-linear.")
    base.add_argument("--target-parameters", type=_target_modules, metavar="A,B",
                      help="Comma-separated parameter names, e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj.")
    verify = command("verify", _verify, "Check an adapter folder, or a registry (audit chain, tables, artifacts).", "path")
    verify.add_argument(
        "--expect-head", metavar="FILE", help="An audit head saved by `peft-graft head`: the chain must still hold it."
    )
    verify.add_argument(
        "--trusted-key", metavar="PUBLIC.pem", help="Also check the adapter folder's graft.sig against this public key."
    )
    verify.add_argument(
        "--base", metavar="MODEL", help="Also load the adapter onto this base (folder or Hub id) and take it off again: "
        "catches what only the base can tell (targets without their Φ, base shapes, regenerated projections)."
    )
    command("sign", _sign, "Sign an adapter folder (writes graft.sig; needs the signing extra).", "path").add_argument(
        "--key", required=True, metavar="PRIVATE.pem", help="PEM elliptic-curve private key (P-256, P-384 or P-521)."
    )
    command("head", _head, "Print the registry's audit head, to keep outside it (pins the chain).", "root")
    command("list", _list, "List the grafts of a registry.", "root").add_argument(
        "--status", type=GraftStatus, choices=list(GraftStatus), metavar="STATUS",
        help=f"Only grafts with this status, any case: {', '.join(s.value.lower() for s in GraftStatus)}.",
    )
    command("show", _show, "Show one graft's record and status history (JSON).", "root", "graft_id")
    command("rollback", _rollback, "Take an accepted graft out of the composition.", "root", "graft_id").add_argument(
        "--reason", default="rolled back from the command line"
    )
    consolidate = command("consolidate", _consolidate, "Merge accepted grafts into a new base.", "root")
    consolidate.add_argument("--base", required=True, help="Folder of the base model the grafts were trained on.")
    consolidate.add_argument("--out", required=True, help="Folder to write the consolidated base to.")
    consolidate.add_argument("--atol", type=float, default=1e-5, help="Largest allowed |Δlogit| vs unmerged.")
    push = command("push", _push, "Push an accepted graft to the Hub.", "root", "graft_id", "repo_id")
    export = command("export", _export, "Write a graft adapter as a plain PEFT LoRA folder or a llama.cpp GGUF LoRA.",
                     "path", "out")
    export.add_argument("--format", choices=["peft-lora", "gguf-lora"], default="peft-lora",
                        help="peft-lora: a LoRA folder for PEFT, vLLM, TGI; gguf-lora: a .gguf for llama.cpp/Ollama.")
    export.add_argument("--base", help="Base model folder or Hub id (default: the one adapter_config.json names).")
    export.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f32", help="GGUF tensor type.")
    pull = command("pull", _pull, "Download a graft from the Hub and verify it.", "repo_id", "local_dir")
    pull.add_argument("--revision")
    pull.add_argument("--graft-id", help="Refuse the repo unless it holds exactly this graft (pins the content).")
    pull.add_argument("--trusted-key", metavar="PUBLIC.pem", help="Refuse the repo unless graft.sig verifies with it.")
    for p in (push, pull):
        p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co).")
        p.add_argument("--token")
    estimate = command(
        "estimate", _estimate, "Plan the memory of fine-tuning a model with a graft and with LoRA, from its config "
        "alone: a preset (qwen2.5-14b, llama-3-70b...), a folder or config.json, or an org/name on the Hub.",
        "model_or_config",
    )
    estimate.add_argument("--quant", choices=["fp32", "fp16", "bf16", "int8", "nf4"], default="nf4",
                          help="How the base is stored (int8/nf4: bitsandbytes).")
    estimate.add_argument("--double-quant", action="store_true", help="nf4 with double quantization.")
    estimate.add_argument("--compute-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                          help="Dtype of a quantized base's other weights and of its computation.")
    estimate.add_argument("--graft", default="r=16,targets=all-linear", metavar="SPEC",
                          help='GraftConfig fields as "key=value,...", targets joined by + (default: %(default)s).')
    estimate.add_argument("--lora-r", type=int, default=8, help="LoRA rank on the same modules (0: no LoRA column).")
    estimate.add_argument("--batch", type=int, default=1)
    estimate.add_argument("--seq-len", type=int, default=2048)
    estimate.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    estimate.add_argument("--gpu-memory", type=float, metavar="GB", help="Say whether training fits a GPU this big.")
    estimate.add_argument("--timeout", type=float, default=10.0, help="Seconds to wait for the Hub (org/name).")
    sens = command("sensitivity", _sensitivity, "Map which modules of a causal LM a graft should go to (gradient "
                   "norm, Fisher, activation energy, projected gradient) on a data sample.", "model")
    sens.add_argument("--data", required=True, help="Text file (model's tokenizer) or JSON list of token-id lists.")
    sens.add_argument("--block-size", type=int, default=64)
    sens.add_argument("--blocks", type=int, default=32, help="Blocks of the sample (default: %(default)s).")
    sens.add_argument("--batch-size", type=int, default=8)
    sens.add_argument("--r", type=int, default=16, help="Graft space size of the projected-gradient score.")
    sens.add_argument("--projection", default="svd", help="Projections of the projected-gradient score.")
    sens.add_argument("--target-modules", type=_target_modules, metavar="A,B", help="Default: every linear map.")
    sens.add_argument("--score", default="projected", help="grad_norm, fisher, activation or projected.")
    sens.add_argument("--out", metavar="MAP.json", help="Write the map as JSON.")
    sens.add_argument("--plot", metavar="HEAT.png", help="Draw the heat map (needs matplotlib: the bench extra).")
    search = command("search", _search, "Grow a model stage by stage through the gates, against a LoRA control at "
                     "the same budget; writes a report.", "config")
    search.add_argument("--model", help="Model folder (overrides the search file).")
    search.add_argument("--budget", type=int, help="Trainable numbers all accepted grafts may use together.")
    search.add_argument("--max-stages", type=int)
    search.add_argument("--out", help="Report folder.")
    search.add_argument("--registry", help="Registry root (default: OUT/registry).")
    search.add_argument("--no-plot", action="store_true", help="Skip the growth-curve plot.")
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the library versions are read when asked, from the installed distributions (no import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    from importlib.metadata import version

    from . import __version__

    return (
        f"peft-graft {__version__} (peft {version('peft')}, transformers {version('transformers')}, "
        f"torch {version('torch')})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PeftGraftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `peft-graft show ... | head` closed the pipe: stop quietly, as other CLIs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
