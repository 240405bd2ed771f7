"""The ``ember`` command line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

import ember


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ember.data import open_dataset

    ds = open_dataset(args.paths, check_tokens=args.check_tokens, vocab_size=args.vocab_size)
    print(f"format      {ds.format}")
    print(f"shards      {len(ds.shards)}")
    print(f"documents   {len(ds):,}")
    print(f"tokens      {ds.num_tokens:,}")
    print(f"dtype       {ds.dtype}")
    print(f"vocab size  {ds.vocab_size if ds.vocab_size is not None else 'not recorded'}")
    if args.check_tokens:
        print("tokens      all within the vocabulary")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ember.data.demo import run_demo

    run_demo(out_dir=args.out, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps)
    return 0


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    items = list(args.config_and_overrides)
    config = None
    if items and "=" not in items[0]:
        config = items.pop(0)
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ValueError(f"expected overrides of the form section.key=value after the config, got {' '.join(bad)!r}")
    return config, items


def _cmd_train(args: argparse.Namespace) -> int:
    from ember.config import load_config
    from ember.train import PretrainingOrchestrator

    config_path, overrides = _split_config_and_overrides(args)
    if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node)
    config = load_config(config_path, overrides)
    orchestrator = PretrainingOrchestrator(config, resume=args.resume)
    summary = orchestrator.train(sample_prompt=args.sample_prompt if args.sample else None)
    if orchestrator.strategy.is_main:
        print(_summary_text(summary))
        if "sample" in summary:
            print("sample:\n" + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
    return 0


def _relaunch_with_torchrun(nproc: int) -> int:
    """``ember train --nproc-per-node N ...``: the same command under torchrun on this node."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc}")
    argv = sys.argv[1:]
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "ember", *rest]
    return subprocess.call(cmd)


def _summary_text(summary: dict) -> str:
    parts = [f"trained to step {summary['steps']} ({summary['tokens_seen']:,} tokens, stopped by {summary['stopped_by']})"]
    if "val_loss" in summary:
        parts.append(f"validation loss {summary['val_loss']:.4f} (perplexity {summary['val_perplexity']:.2f})")
    parts.append(f"run directory: {summary['run_dir']}")
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Pretrain Llama-family language models.")
    p.add_argument("--version", action="version", version=f"ember {ember.__version__}")
    # The DeepSpeed launcher passes --local_rank before the command; ranks come from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="pretrain a Llama model from a YAML config (no config: the built-in quickstart)",
        description="Trains from CONFIG (a YAML file or a built-in config name; default: quickstart), "
        "with dotted overrides such as training.max_steps=100.",
    )
    t.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    t.add_argument("--resume", default=None, help="'auto' to continue from the latest checkpoint of the run, or a checkpoint directory")
    t.add_argument("--no-sample", dest="sample", action="store_false", help="do not print a generated sample at the end")
    t.add_argument("--sample-prompt", default="def ", help="prompt for the sample (byte tokenizer runs)")
    t.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start this many processes on this machine (a shortcut for torchrun --standalone --nproc-per-node N -m ember train ...)",
    )

    t.set_defaults(func=_cmd_train)

    q = sub.add_parser("inspect", help="describe token shards (any supported format) and validate them")
    q.add_argument("paths", nargs="+", help="shard files, Megatron prefixes or directories")
    q.add_argument("--check-tokens", action="store_true", help="also check every token id against the vocabulary")
    q.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --check-tokens (default: as recorded)")
    q.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("demo", help="tokenize the standard library into shards and stream batches from them")
    d.add_argument("--out", default=None, help="cache directory for the shards (default: a temporary directory)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--steps", type=int, default=500, help="batches to read")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`ember train cfg.yaml --resume auto training.max_steps=10`).
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "train" and not any(e.startswith("-") for e in extra):
        args.config_and_overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
