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


def _data_synth(args: argparse.Namespace) -> int:
    from .data import Manifest, synth_dataset

    synth_dataset(
        args.out, images=args.images, img_dim=args.img_dim,
        img_label_dim=None if args.img_label_dim == 0 else args.img_label_dim,
        min_regions=args.min_regions, max_regions=args.max_regions, min_captions=args.min_captions,
        max_captions=args.max_captions, num_classes=args.num_classes, seed=args.seed, world_seed=args.world_seed,
        max_shard_bytes=int(args.shard_mb * 2**20), name=args.name,
    )
    manifest = Manifest.load(args.out)
    print(f"wrote {manifest.images} images / {manifest.pairs} pairs in {len(manifest.shards)} shards to {args.out}")
    return 0


def _print_conversion(out: str, manifest, report) -> int:
    print(f"wrote {manifest.images} images / {manifest.pairs} pairs in {len(manifest.shards)} shards to {out}")
    print(f"  images without captions: {report.images_without_captions}, captions without image: "
          f"{report.captions_without_image}, skipped images: {report.skipped_images}")
    for problem in report.problems[:10]:
        print(f"  skipped: {problem}")
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from .data.convert import convert_original, convert_tsv, convert_uniter_db

    common = dict(conf_th=args.conf_th, min_regions=args.min_regions, max_regions=args.max_regions, name=args.name,
                  on_error=args.on_error)
    if args.layout == "uniter-db" and args.shard_mb is not None:
        raise ValueError("convert uniter-db sizes shards by --shard-images (each worker writes whole shards, and an "
                         "interrupted conversion restarts per shard); --shard-mb is for original and tsv")
    if args.layout != "uniter-db":
        common["max_shard_bytes"] = int((args.shard_mb or 512) * 2**20)
    if args.layout == "original":
        if not (args.img_dir and args.txt):
            raise ValueError("convert original needs --img-dir and --txt")
        manifest, report = convert_original(args.img_dir, args.txt, args.out, vocab_file=args.vocab,
                                            with_soft_labels=not args.no_soft_labels, **common)
    elif args.layout == "uniter-db":
        if not (args.img_db and args.txt_db):
            raise ValueError("convert uniter-db needs --img-db (one or more) and --txt-db")
        manifest, report = convert_uniter_db(args.img_db, args.txt_db, args.out, vocab_file=args.vocab,
                                             with_soft_labels=not args.no_soft_labels, workers=args.workers,
                                             images_per_shard=args.shard_images, restart=args.restart,
                                             progress=sys.stderr.isatty(),
                                             log=lambda line: print(line, file=sys.stderr), **common)
    else:
        if not (args.tsv and args.captions and args.tokenizer):
            raise ValueError("convert tsv needs --tsv, --captions and --tokenizer")
        manifest, report = convert_tsv(args.tsv, args.captions, args.tokenizer, args.out, **common)
    return _print_conversion(args.out, manifest, report)


def _data_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset

    report = inspect_dataset(args.folder)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['folder']}: {report['name']} (format v{report['format_version']}), {report['shards']} shards, "
              f"{report['images']} images, {report['pairs']} pairs; read {report['images_read']} images")
        print(f"  features {report['img_dim']}-d, soft labels {report['img_label_dim']}, "
              f"tokenizer {report['tokenizer']}")
        print(f"  regions per image {report['regions']}")
        print(f"  caption tokens {report['text_lengths']}")
        print(f"  problems: {report['problems'] or 'none'}")
        for example in report["examples"]:
            print(f"    {example}")
    return 0 if report["ok"] else 1


def _pretrain(args: argparse.Namespace) -> int:
    from .train.launch import launch_job

    return launch_job(args)


def _prebuild(args: argparse.Namespace) -> int:
    import torch

    from .train.extensions import extensions_dir, prebuild

    try:
        built = prebuild(on_gpu=torch.cuda.is_available())
    except RuntimeError as error:
        print(f"uniter-ds prebuild: error: {error}", file=sys.stderr)
        return 2
    print(f"built {', '.join(built) or 'nothing (no op to build here)'} in {extensions_dir()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.checkpoint, args.out, fmt=args.format, dtype=args.dtype, heads=args.heads,
                    config_file=args.config, overwrite=args.overwrite)
    print(f"exported step {result['step']} ({result['dtype']}, {'with' if result['heads'] else 'without'} heads), "
          f"verified by reloading:")
    for fmt, path in result["written"].items():
        print(f"  {fmt}: {path}")
    return 0


def _import_uniter(args: argparse.Namespace) -> int:
    from .export import import_uniter

    result = import_uniter(args.file, args.config, args.out, overwrite=args.overwrite)
    print(f"wrote {result['out']} (continue pretraining with model.init_from: hf:{result['out']})")
    print(f"  missing keys ({len(result['missing'])}): {', '.join(result['missing']) or '-'}")
    print(f"  unexpected keys ({len(result['unexpected'])}): {', '.join(result['unexpected']) or '-'}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .analysis.attention import PATTERNS, write_report
    from .export import load_encoder
    from .model import build_batch
    from .train.evaluate import retrieval_pairs

    model = load_encoder(args.model, args.config)
    pairs = retrieval_pairs([args.data], args.samples, None)
    if not pairs:
        raise ValueError(f"{args.data}: no image-text pairs to read")
    if pairs[0].image.feat.shape[1] != model.config.img_dim:
        raise ValueError(f"{args.data}: features are {pairs[0].image.feat.shape[1]}-d, the model expects "
                         f"img_dim={model.config.img_dim}")
    batch = build_batch([torch.from_numpy(p.input_ids) for p in pairs],
                        [torch.from_numpy(p.image.feat.astype(np.float32)) for p in pairs],
                        [torch.from_numpy(p.image.pos.copy()) for p in pairs])
    analysis = write_report(model, batch, args.out, source=str(args.model))
    print(f"{analysis['layers']} layers x {analysis['heads']} heads over {len(pairs)} samples")
    print(f"{'layer':<6}" + "".join(f"{p:>19}" for p in PATTERNS))
    for layer, counts in enumerate(analysis["pattern_counts_by_layer"]):
        print(f"{layer:<6}" + "".join(f"{counts[p]:>19}" for p in PATTERNS))
    print(f"wrote {args.out}/attention.json, attention_maps.png, attention_patterns.png")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .analysis.ablation import ARMS, markdown_table, run_grid, write_outputs

    names = args.arms or [arm.name for arm in ARMS]
    unknown = sorted(set(names) - {arm.name for arm in ARMS})
    if unknown:
        raise ValueError(f"--arms: unknown {unknown}; known: {', '.join(repr(a.name) for a in ARMS)}")
    arms = [arm for arm in ARMS if arm.name in names]
    report = run_grid(args.config, args.out, arms=arms, seeds=args.seeds, steps=args.steps,
                      probe_train_images=args.probe_train_images, probe_test_images=args.probe_test_images,
                      probe_steps=args.probe_steps, num_gpus=args.num_gpus, extra=args.set)
    report["command"] = "uniter-ds " + " ".join(["ablate", *args.argv])
    written = write_outputs(report, args.out, plot=not args.no_plots)
    print(markdown_table(report))
    print(f"{report['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniter-ds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("model-info", help="parameter counts and active kernels of a model config")
    info.add_argument("--preset", default="base", choices=["tiny", "base", "large"], help="model size")
    info.add_argument("--config", help="a UNITER json config instead of a preset")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_model_info)

    data = commands.add_parser("data", help="make, convert and check datasets of shards").add_subparsers(
        dest="data_command", required=True)
    synth = data.add_parser("synth", help="a synthetic grounded corpus (tests, demos, benchmarks)")
    synth.add_argument("--out", required=True, help="the dataset folder to write (shards + manifest.json)")
    synth.add_argument("--images", type=int, default=1000, help="images to write")
    synth.add_argument("--img-dim", type=int, default=2048, help="region feature size (2048 as BUTD features)")
    synth.add_argument("--img-label-dim", type=int, default=1601, help="0: no soft labels")
    synth.add_argument("--min-regions", type=int, default=10, help="regions per image: at least")
    synth.add_argument("--max-regions", type=int, default=100, help="regions per image: at most")
    synth.add_argument("--min-captions", type=int, default=1, help="captions per image: at least")
    synth.add_argument("--max-captions", type=int, default=5, help="captions per image: at most")
    synth.add_argument("--num-classes", type=int, default=40,
                       help="object classes of the synthetic world (each caption names its image's objects)")
    synth.add_argument("--seed", type=int, default=0, help="which images are drawn")
    synth.add_argument("--world-seed", type=int, default=0, help="the same for a training set and its held-out set")
    synth.add_argument("--shard-mb", type=float, default=64, help="shard size in MiB")
    synth.add_argument("--name", default="synth", help="the dataset's name in its manifest")
    synth.set_defaults(run=_data_synth)

    convert = data.add_parser("convert", help="from the released UNITER databases, per-image npz files or a "
                              "bottom-up-attention TSV")
    convert.add_argument("layout", choices=["uniter-db", "original", "tsv"],
                         help="uniter-db: the released LMDB img_db/txt_db; original: per-image .npz files + a text "
                         "table; tsv: bottom-up-attention features")
    convert.add_argument("--out", required=True, help="the dataset folder to write (shards + manifest.json)")
    convert.add_argument("--img-db", action="append", help="uniter-db: an img_db/<name> folder (repeat for several)")
    convert.add_argument("--txt-db", help="uniter-db: a txt_db/<name>.db folder")
    convert.add_argument("--workers", type=int, default=1,
                         help="uniter-db: processes converting whole shards at once (the reference used 8); the "
                         "shards are the same whatever their number")
    convert.add_argument("--shard-images", type=int, default=1000,
                         help="uniter-db: images per shard (1000: ~260 MB at 36 regions with soft labels)")
    convert.add_argument("--restart", action="store_true",
                         help="uniter-db: start over instead of continuing an interrupted conversion into --out")
    convert.add_argument("--img-dir", help="original: folder of per-image .npz files")
    convert.add_argument("--txt", help="original: JSON-lines text table or LMDB txt_db folder (meta.json beside/in it)")
    convert.add_argument("--vocab", help="uniter-db, original: the tokenizer's vocab.txt; its hash is recorded and a "
                         "copy kept beside the shards, so exports carry the tokenizer")
    convert.add_argument("--no-soft-labels", action="store_true", help="uniter-db, original: no soft labels")
    convert.add_argument("--tsv", help="tsv: the bottom-up-attention features file")
    convert.add_argument("--captions", help="tsv: JSON lines of {image_id, caption}")
    convert.add_argument("--tokenizer", help="tsv: a Hugging Face tokenizer folder")
    convert.add_argument("--conf-th", type=float, default=0.2,
                         help="keep the regions whose detector confidence is at least this (the reference's 0.2)")
    convert.add_argument("--min-regions", type=int, default=10, help="keep at least this many regions per image")
    convert.add_argument("--max-regions", type=int, default=100, help="keep at most this many regions per image")
    convert.add_argument("--shard-mb", type=float, help="original, tsv: shard size (default 512)")
    convert.add_argument("--name", default="data", help="the dataset's name in its manifest")
    convert.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                         help="a bad input record stops the conversion, or is skipped and counted in the report")
    convert.set_defaults(run=_data_convert)

    inspect = data.add_parser("inspect", help="summary of a dataset folder; validates every sample")
    inspect.add_argument("folder", help="a dataset folder or URL (with its manifest.json)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_data_inspect)

    from .train.launch import add_arguments as pretrain_arguments

    pretrain = commands.add_parser("pretrain", help="validate the experiment config, then start the deepspeed "
                                                    "launcher on the pretraining entry point")
    pretrain_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain)

    prebuild = commands.add_parser("prebuild", help="build DeepSpeed's JIT-compiled ops now, into this "
                                   "environment's extensions folder, so that no job compiles them at start")
    prebuild.set_defaults(run=_prebuild)

    exporter = commands.add_parser("export", help="trained weights -> a Hugging Face-style folder and/or the "
                                                  "original UNITER layout, verified by reloading")
    exporter.add_argument("checkpoint", help="a run directory, a checkpoint folder, or a state dict file")
    exporter.add_argument("--out", required=True, help="the folder to write")
    exporter.add_argument("--format", choices=["hf", "uniter", "both"], default="both",
                          help="hf: OUT/hf, config.json + model.safetensors for transformers; uniter: OUT/uniter, "
                               "a .pt in the original UNITER layout; both: the two")
    exporter.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights' precision")
    exporter.add_argument("--heads", action="store_true", help="keep the pretraining heads")
    exporter.add_argument("--config", help="a UNITER json config (for a plain state dict file)")
    exporter.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    exporter.set_defaults(run=_export)

    importer = commands.add_parser("import-uniter", help="an original UNITER checkpoint -> a loadable folder")
    importer.add_argument("file", help="the original .pt (pretrained or *-init.pt)")
    importer.add_argument("--config", required=True, help="its json config (uniter-base.json style)")
    importer.add_argument("--out", required=True, help="the folder to write (save_pretrained layout)")
    importer.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    importer.set_defaults(run=_import_uniter)

    attention = commands.add_parser("attention", help="per-layer, per-head attention maps of a trained model, "
                                                      "classified into the paper's six patterns")
    attention.add_argument("model", help="an export / save_pretrained folder, a run directory, a checkpoint, "
                                         "or a state dict file (with --config)")
    attention.add_argument("--data", required=True, help="a dataset folder: its first images, first caption each")
    attention.add_argument("--samples", type=int, default=8, help="image-caption pairs to average over")
    attention.add_argument("--config", help="a UNITER json config, for a plain state dict file")
    attention.add_argument("--out", required=True, help="folder for attention.json and the PNGs")
    attention.set_defaults(run=_attention)

    ablate = commands.add_parser("ablate", help="the paper's ablations in miniature: pretrain a grid of task "
                                                "mixes / masking / WRA settings, probe every export, Meta-Sum table")
    ablate.add_argument("--config", required=True, help="the base experiment config every arm starts from")
    ablate.add_argument("--out", required=True, help="folder for the runs, ablation.json/.md/.png")
    ablate.add_argument("--arms", nargs="+", help="a subset of the arms, by name (default: all)")
    ablate.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="a run per arm and seed")
    ablate.add_argument("--steps", type=int, default=400, help="pretraining steps per arm and seed")
    ablate.add_argument("--num-gpus", type=int, default=2, help="ranks per run (CPU ranks without a GPU)")
    ablate.add_argument("--probe-train-images", type=int, default=600, help="images the probes train on")
    ablate.add_argument("--probe-test-images", type=int, default=300, help="held-out images the probes are scored on")
    ablate.add_argument("--probe-steps", type=int, default=300, help="training steps per probe")
    ablate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the base config for every arm")
    ablate.add_argument("--no-plots", action="store_true", help="write the JSON and markdown reports only")
    ablate.set_defaults(run=_ablate)

    from .bench.cli import add_parser as add_bench_parser

    add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"uniter-ds {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
