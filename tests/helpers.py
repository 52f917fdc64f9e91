"""Tiny samples and batches for the model tests; a CPU stand-in for CUDA graphs; a loopback HTTP server
for the data tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from uniter_ds.model import IGNORE_INDEX, UniterBatch, UniterConfig, build_batch


def random_sample(config: UniterConfig, txt_len: int, num_regions: int, generator: torch.Generator) -> dict:
    """One image-text pair with its MLM / MRM targets, as the data path would produce it."""
    words = torch.randint(5, config.vocab_size, (txt_len - 2,), generator=generator)
    input_ids = torch.cat([torch.tensor([1]), words, torch.tensor([2])])
    txt_labels = torch.full((txt_len,), IGNORE_INDEX)
    masked = torch.randperm(txt_len - 2, generator=generator)[: max(1, (txt_len - 2) // 4)] + 1
    txt_labels[masked] = input_ids[masked]
    img_masks = torch.zeros(num_regions, dtype=torch.bool)
    img_masks[torch.randperm(num_regions, generator=generator)[: max(1, num_regions // 4)]] = True
    boxes = torch.rand(num_regions, 7, generator=generator)
    soft = torch.softmax(3 * torch.randn(num_regions, config.img_label_dim, generator=generator), -1)
    return {
        "input_ids": input_ids,
        "img_feat": torch.randn(num_regions, config.img_dim, generator=generator),
        "img_pos": boxes,
        "txt_labels": txt_labels,
        "img_masks": img_masks,
        "img_soft_labels": soft,
    }


def collate(samples: list[dict], itm_targets: list[int] | None = None, pack_row_len: int | None = None
            ) -> UniterBatch:
    return build_batch(
        [s["input_ids"] for s in samples],
        [s["img_feat"] for s in samples],
        [s["img_pos"] for s in samples],
        txt_labels=[s["txt_labels"] for s in samples],
        img_masks=[s["img_masks"] for s in samples],
        img_soft_labels=[s["img_soft_labels"] for s in samples],
        itm_targets=itm_targets if itm_targets is not None else [1] * len(samples),
        pack_row_len=pack_row_len,
    )


def graphed_on_the_cpu(module: torch.nn.Module, sample_args: tuple) -> object:
    """``torch.cuda.make_graphed_callables``' contract, kept on the CPU (torch/cuda/graphs.py): the
    module runs inside one autograd Function whose output and whose gradients (for the input and every
    parameter) live in static buffers that the next call overwrites, handed out as detached aliases."""
    params = tuple(p for p in module.parameters() if p.requires_grad)
    buffers: dict[int, torch.Tensor] = {}

    def static(slot: int, value: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        if slot not in buffers:
            buffers[slot] = torch.empty_like(value)
        return buffers[slot].copy_(value).detach()

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, key_mask, *weights):
            with torch.enable_grad():
                ctx.x = x.detach().requires_grad_(x.requires_grad)
                ctx.out = module(ctx.x, key_mask)
            return static(-1, ctx.out.detach())

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out):
            grads = torch.autograd.grad(ctx.out, (ctx.x, *params), grad_out, allow_unused=True)
            return (static(0, grads[0]), None, *(static(i + 1, g) for i, g in enumerate(grads[1:])))

    assert sample_args[0].requires_grad
    return lambda x, key_mask: Replay.apply(x, key_mask, *params)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def serve_folder(root: Path, handler: type[http.server.SimpleHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``root`` from a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
