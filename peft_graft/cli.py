"""`peft-graft` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .artifacts import verify_adapter
from .errors import PeftGraftError


def _inspect(args: argparse.Namespace) -> int:
    summary = verify_adapter(args.path)
    config = summary.config
    report = {
        "path": str(summary.path),
        "r": config["r"],
        "phi": config["phi"],
        "projection": config["projection"],
        "mode": config["mode"],
        "modules": len(summary.modules),
        "phi_params": summary.num_phi_params,
        "stores_projections": summary.stores_projections,
        "file_bytes": summary.file_bytes,
        "base_model": config.get("base_model_name_or_path"),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    summary = verify_adapter(args.path)
    print(f"OK: {summary.path} ({len(summary.modules)} grafted modules, {summary.file_bytes:,} bytes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-graft", description="Inspect and check graft adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="Summarise a saved graft adapter folder.")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="Print machine-readable JSON.")
    inspect.set_defaults(func=_inspect)
    verify = sub.add_parser("verify", help="Check a saved graft adapter folder is complete and finite.")
    verify.add_argument("path")
    verify.set_defaults(func=_verify)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PeftGraftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
