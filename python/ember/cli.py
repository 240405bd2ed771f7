"""The ``ember`` command line."""

from __future__ import annotations

import argparse
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

    run_demo(out_dir=args.out, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, corpus_mb=args.corpus_mb)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Pretrain Llama-family language models.")
    p.add_argument("--version", action="version", version=f"ember {ember.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("inspect", help="describe token shards (any supported format) and validate them")
    q.add_argument("paths", nargs="+", help="shard files, Megatron prefixes or directories")
    q.add_argument("--check-tokens", action="store_true", help="also check every token id against the vocabulary")
    q.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --check-tokens (default: as recorded)")
    q.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("demo", help="tokenize the standard library into shards and stream batches from them")
    d.add_argument("--out", default=None, help="directory for the shards (default: a temporary directory)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--steps", type=int, default=500, help="batches to read")
    d.add_argument("--corpus-mb", type=float, default=32.0, help="megabytes of source text to tokenize")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
