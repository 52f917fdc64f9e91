"""Grounding probe: does a small UNITER leave chance on the synthetic corpus? One process, minutes.

A search tool for issue 12's "main job that visibly learns" (not the main job itself): the real model,
loader and losses with torch AdamW as the job sets it up (betas 0.9/0.98, clip 5, linear warm-up and
decay), one process, no DeepSpeed. Prints held-out ITM accuracy every steps/6, then the measures of
benchmarks/learning_check.py (ITM, object-word MLM with the own / a swapped image, region-state std).

    python benchmarks/grounding_probe.py --mix itm:3,mlm:4,mrfr:2,mrc-kl:2 --steps 1500 [--hidden 128 --layers 4]

Needs data/synth-train and data/synth-val (`bash launch/dev.sh demo` writes them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_check import held_out_pairs, measure  # noqa: E402

from uniter_ds.data.loader import LoaderConfig, build_loader  # noqa: E402
from uniter_ds.model import UniterConfig, UniterForPretraining  # noqa: E402
from uniter_ds.train.engine import param_groups  # noqa: E402


def text_only(batch):
    """The MLM batch without its regions: [CLS] words [SEP] alone, the same masked tokens."""
    from uniter_ds.model.inputs import batch_from_padded

    old_len = batch.seq_len
    out = batch_from_padded(input_ids=batch.input_ids, txt_lens=batch.txt_lens, img_feat=batch.img_feat[:, :0],
                            img_pos=batch.img_pos[:, :0], img_lens=torch.zeros_like(batch.img_lens))
    rows, cols = batch.mlm_positions // old_len, batch.mlm_positions % old_len
    out.mlm_positions, out.mlm_labels = rows * out.seq_len + cols, batch.mlm_labels
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", default="itm:1", help="task:ratio,... e.g. itm:3,mlm:4,mrfr:2,mrc-kl:2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--wra", type=float, default=0.1)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--mrc-kl", default="original", choices=["original", "per_region"])
    parser.add_argument("--init-range", type=float, default=0.02, help="initializer_range (BERT: 0.02)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--text-stage", type=int, default=0,
                        help="steps of text-only MLM (the regions removed) before the mix: a stand-in for BERT")
    parser.add_argument("--stage1-mix", default="mlm:1", help="the task mix of --stage1-steps")
    parser.add_argument("--stage1-steps", type=int, default=0, help="steps of --stage1-mix before the mix")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = UniterConfig.from_preset("tiny", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      hidden_dropout_prob=args.dropout,
                                      attention_probs_dropout_prob=args.dropout, initializer_range=args.init_range)
    model = UniterForPretraining(config, wra_weight=args.wra, mrc_kl=args.mrc_kl)
    mix = {task: float(ratio) for task, ratio in (item.split(":") for item in args.mix.split(","))}
    data = Path(args.data_dir)
    train = LoaderConfig(token_budget=args.budget, split="resampled", num_workers=0, seed=args.seed)
    loaders = {task: iter(build_loader([data / "synth-train"], task, train)) for task in mix}
    held_out = LoaderConfig(token_budget=4096, split="exact", num_workers=0, seed=1)
    val = list(itertools.islice(iter(build_loader([data / "synth-val"], "itm", held_out)), 10))
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    draw = torch.Generator().manual_seed(args.seed)
    tasks, weights = list(mix), torch.tensor(list(mix.values()))
    warmup = max(1, args.steps // 20)

    def itm_accuracy() -> float:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in val:
                correct += int(model(batch, "itm").num_correct)
                total += batch.batch_size
        model.train()
        return correct / total

    def train_step(batch, task: str, lr: float) -> None:  # as the job: AdamW, gradient clipping at 5
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(batch, task).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    start, curve = time.time(), []
    if args.text_stage:
        text_loader = iter(build_loader([data / "synth-train"], "mlm", train))
        for step in range(1, args.text_stage + 1):
            train_step(text_only(next(text_loader)), "mlm", args.lr * min(1.0, step / warmup))
        curve.append(("text stage", round(itm_accuracy(), 3)))
    if args.stage1_steps:
        mix1 = {task: float(ratio) for task, ratio in (item.split(":") for item in args.stage1_mix.split(","))}
        for task in set(mix1) - set(loaders):
            loaders[task] = iter(build_loader([data / "synth-train"], task, train))
        tasks1, weights1 = list(mix1), torch.tensor(list(mix1.values()))
        for step in range(1, args.stage1_steps + 1):
            task = tasks1[int(torch.multinomial(weights1, 1, generator=draw))]
            train_step(next(loaders[task]), task, args.lr * min(1.0, step / warmup))
        curve.append(("stage 1", round(itm_accuracy(), 3)))
    for step in range(1, args.steps + 1):
        task = tasks[int(torch.multinomial(weights, 1, generator=draw))]
        scale = step / warmup if step <= warmup else max(0.0, (args.steps - step) / (args.steps - warmup))
        train_step(next(loaders[task]), task, args.lr * scale)
        if step % max(1, args.steps // 6) == 0:
            curve.append((step, round(itm_accuracy(), 3)))
    pairs, tokenizer = held_out_pairs(data / "synth-val", 300)
    result = {"args": vars(args), "itm_curve": curve, "seconds": round(time.time() - start),
              "final": measure(model.eval(), pairs, tokenizer)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
