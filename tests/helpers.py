"""Tiny samples and batches for the model tests (from uniter_ds/bench/samples.py); a CPU stand-in for
CUDA graphs; a loopback HTTP server for the data tests; checkpoint files that would run code."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from uniter_ds.bench.samples import collate, random_sample  # noqa: F401 -- the tests' samples and batches


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


class CountingHandler(QuietHandler):
    """Counts the GET requests per path (``CountingHandler.requests``; clear it between servers)."""

    requests: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        CountingHandler.requests[self.path] = CountingHandler.requests.get(self.path, 0) + 1
        super().do_GET()


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


class _OpensAFile:
    """Unpickled without restriction, this creates ``path``: the stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def poison_checkpoint_file(file: Path, marker: Path) -> None:
    """Rewrite the ``.pt`` file ``file`` of a checkpoint with a payload that creates ``marker`` when the file is
    unpickled, and record the new size in the checkpoint's ``complete.json`` as a forger would: the size
    check passes, only the load can refuse it."""
    import json

    state = torch.load(file, map_location="cpu", weights_only=False)  # our own file, written by the test's run
    if isinstance(state, dict):
        state["payload"] = _OpensAFile(marker)
    else:
        state = {"state": state, "payload": _OpensAFile(marker)}
    torch.save(state, file)
    complete = file.parent / "complete.json"
    if complete.exists():
        record = json.loads(complete.read_text())
        record["files"][file.name] = file.stat().st_size
        complete.write_text(json.dumps(record))
