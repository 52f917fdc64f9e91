"""Does ``torch.compile`` of the encoder layers give eager's gradients? One table of variants.

    python benchmarks/compile_check.py [--devices cpu cuda]

The first GPU run (2026-11-27, torch 2.11 on an H200) found compiled losses equal to eager but
gradients that differ (tests/test_gpu.py, and tests/test_kernels_and_cli.py run on that machine's
CPU), where torch 2.13 on the CPU machine agrees. Each variant below compiles differently; the
largest relative gradient difference per group of parameters says which ones are right.

Cause (found 2026-11-28 with torch 2.11.0 on the CPU machine): torch 2.11 compiles an autograd.Function
whose forward changes a tensor in place with wrong gradients (pytorch/pytorch#180642), and DeepSpeed's
ZeRO-3 engine makes ``torch.nn.functional.linear`` such a function for the rest of the process. The
``-zero3-linear`` variants install DeepSpeed's linear as a ZeRO-3 engine would:

    python benchmarks/compile_check.py --devices cpu --variants layers-dynamic layers-dynamic-zero3-linear
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch


def groups(name: str) -> str:
    if name.startswith("uniter.encoder.layers.0."):
        return "layer 0"
    if name.startswith("uniter.encoder."):
        return "other layers"
    if name.startswith("uniter.embeddings") or name.startswith("uniter.img_embeddings"):
        return "embeddings"
    return "heads/pooler"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--variants", nargs="+",
                        default=["layers-dynamic", "layers-static", "layers-default", "layers-dynamic-math",
                                 "encoder-dynamic", "layers-dynamic-zero3-linear"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from uniter_ds.bench.samples import collate, random_sample
    from uniter_ds.model import UniterConfig, UniterForPretraining
    from uniter_ds.model.kernels import sdpa_backend

    config = UniterConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    print(f"torch {torch.__version__}")
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        for variant in args.variants:
            torch.manual_seed(0)
            eager = UniterForPretraining(config).to(device).eval()
            compiled = copy.deepcopy(eager)
            encoder = compiled.uniter.encoder
            if variant.endswith("-zero3-linear"):
                from deepspeed.runtime.zero.linear import zero3_linear_wrap

                torch.nn.functional.linear = zero3_linear_wrap
            if variant.startswith("layers"):
                dynamic = {"layers-static": False, "layers-default": None}.get(variant, True)
                for layer in encoder.layers:
                    layer.compile(dynamic=dynamic)
            else:
                encoder.compile(dynamic=True)
            backend = "math" if variant.endswith("-math") else "auto"
            g = torch.Generator().manual_seed(1)
            start = time.perf_counter()
            loss_diff, worst = 0.0, {}
            try:
                for lengths in ([(5, 7), (9, 3)], [(12, 10), (4, 4), (6, 9)]):
                    batch = collate([random_sample(config, t, r, g) for t, r in lengths]).to(device)
                    losses = []
                    for model in (eager, compiled):
                        model.zero_grad()
                        with sdpa_backend(backend):
                            loss = model(batch, "mlm").loss
                            loss.backward()
                        losses.append(float(loss))
                    loss_diff = max(loss_diff, abs(losses[1] - losses[0]) / abs(losses[0]))
                    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
                        if a.grad is None:
                            continue
                        if b.grad is None:
                            worst[groups(name)] = float("inf")
                            continue
                        rel = float((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp(min=1e-12))
                        worst[groups(name)] = max(worst.get(groups(name), 0.0), rel)
                verdict = "OK" if max(worst.values()) < 1e-3 and loss_diff < 1e-5 else "DIFFERS"
                print(f"{device:<5} {variant:<22} loss {loss_diff:.1e}  grads "
                      + "  ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items()))
                      + f"  {verdict} ({time.perf_counter() - start:.0f}s)", flush=True)
            except Exception as error:  # noqa: BLE001 - a variant that fails is a row of the table
                print(f"{device:<5} {variant:<22} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
            torch._dynamo.reset()
            torch.nn.functional.linear = torch._C._nn.linear
    return 0


if __name__ == "__main__":
    sys.exit(main())
