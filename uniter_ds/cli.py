"""The ``uniter-ds`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _model_info(args: argparse.Namespace) -> int:
    import torch

    from .model import UniterConfig, UniterForPretraining, active_kernels

    config = UniterConfig.from_json_file(args.config) if args.config else UniterConfig.from_preset(args.preset)
    with torch.device("meta"):  # counts and names only: allocate nothing
        model = UniterForPretraining(config)
    params = dict(model.uniter.named_parameters())
    counts = {
        "transformer_and_pooler": sum(p.numel() for n, p in params.items() if n.startswith(("encoder.", "pooler"))),
        "embeddings": sum(p.numel() for n, p in params.items() if "embeddings" in n),
        "encoder_total": sum(p.numel() for p in params.values()),
        "with_pretraining_heads": sum(p.numel() for p in model.parameters()),
    }
    info = {"config": config.to_dict(), "parameters": counts, "kernels": active_kernels()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"UNITER {args.config or args.preset}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{config.num_attention_heads} heads, FFN {config.intermediate_size}")
        for name, count in counts.items():
            print(f"  {name:<24} {count / 1e6:9.2f}M")
        for name, kernel in info["kernels"].items():
            print(f"  kernel {name:<17} {kernel}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniter-ds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("model-info", help="parameter counts and active kernels of a model config")
    info.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    info.add_argument("--config", help="a UNITER json config instead of a preset")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_model_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"uniter-ds {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
