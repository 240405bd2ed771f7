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


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ember.train.convert import convert_to_hf

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, None: None}[args.dtype]
    out = convert_to_hf(args.checkpoint, args.out_dir, dtype=dtype, tokenizer_dir=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ember.data.demo import run_demo

    run_demo(out_dir=args.out, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps)
    return 0


# Options of `ember prepare` that shape the output: on the command line, or in a config's data.prepare.
_PREPARE_OPTIONS = ("output", "tokenizer", "shard_tokens", "validation_fraction", "validation_count", "bos", "eos",
                    "text_field", "txt_mode", "skip_bad")


def _cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from ember.data.prepare import PrepareError, prepare

    sources = list(args.sources)
    t0 = time.perf_counter()
    progress = False if args.no_progress else None
    if sources[0].lower().endswith((".yaml", ".yml")):
        from ember.config import load_config

        given = [f"--{k.replace('_', '-')}" for k in _PREPARE_OPTIONS if getattr(args, k) is not None]
        if given:
            raise ValueError(f"with a config, set {', '.join(given)} in its data.prepare section or as overrides (data.prepare.KEY=VALUE)")
        bad = [o for o in sources[1:] if "=" not in o]
        if bad:
            raise ValueError(f"expected overrides of the form data.prepare.key=value after the config, got {' '.join(bad)!r}")
        config = load_config(sources[0], sources[1:])
        if not config.data.prepare.inputs:
            raise PrepareError("the config has no data.prepare section (data.prepare.inputs and data.prepare.output)")
        workers = args.workers if args.workers is not None else config.data.prepare.workers
        manifest = prepare(**config.data.prepare_arguments(), workers=workers, overwrite=args.overwrite, progress=progress,
                           native_bpe=not args.library_tokenizer)
        output = config.data.prepare.output
    else:
        if args.output is None:
            raise ValueError("--output DIR is required (or give a YAML config with a data.prepare section)")
        options = {k: getattr(args, k) for k in _PREPARE_OPTIONS if getattr(args, k) is not None}
        manifest = prepare(sources, workers=args.workers, overwrite=args.overwrite, progress=progress,
                           native_bpe=not args.library_tokenizer, **options)
        output = args.output
    print(_prepare_summary(manifest, output, time.perf_counter() - t0))
    return 0


def _prepare_summary(m: dict, output: str, seconds: float) -> str:
    t = m["totals"]
    lines = [
        f"prepared {t['documents']:,} documents ({t['text_bytes'] / 1e6:,.1f} MB of text from {t['files']:,} files) "
        f"into {output}: {t['tokens']:,} tokens, {m['dtype']}, tokenizer {m['tokenizer']['name']} (vocabulary {m['tokenizer']['vocab_size']:,})"
    ]
    by = m.get("encoded_by") or {}
    if by.get("engine") == "native":
        handed = by.get("library_documents") or 0
        lines.append(
            "  encoded by Ember's native byte-level BPE (the tokenizers library's ids)"
            + (f"; {handed:,} documents holding an added token's text by the library" if handed else "")
        )
    elif by.get("engine") == "tokenizers":
        lines.append(f"  encoded by the tokenizers library: {by.get('note')}")
    for name, split in m["splits"].items():
        if split["documents"]:
            lines.append(
                f"  {name:<10} {split['documents']:>12,} documents {split['tokens']:>15,} tokens "
                f"{len(split['shards']):>5} shard{'s' if len(split['shards']) != 1 else ' '}  {output}/{name}"
            )
    if t["skipped_empty"] or t["skipped_bad"]:
        first = next((f["first_bad"] for f in m["files"] if f.get("first_bad")), None)
        lines.append(f"  skipped {t['skipped_empty']:,} empty and {t['skipped_bad']:,} bad records" + (f" (first bad: {first})" if first else ""))
    if m["options"]["validation_fraction"] and not m["splits"]["validation"]["documents"]:
        lines.append("  note: the validation split is empty (too few documents for validation_fraction)")
    lines.append(f"in {seconds:.1f} s ({t['text_bytes'] / 1e6 / max(seconds, 1e-9):,.1f} MB/s of text, this run)")
    return "\n".join(lines)


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


def _cmd_bench(args: argparse.Namespace) -> int:
    from ember.bench import run_bench

    return run_bench(args.suite, small=args.small, json_path=args.json)


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

    c = sub.add_parser("convert", help="convert an Ember checkpoint to a Hugging Face checkpoint")
    c.add_argument("checkpoint", help="a checkpoint directory (step-N), a run's checkpoints directory, or a run directory (latest checkpoint)")
    c.add_argument("--to", choices=["hf"], required=True, help="output format")
    c.add_argument("out_dir", help="directory to write: a new or empty one, or an earlier export with --overwrite")
    c.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None, help="weight dtype (default: as stored, float32)")
    c.add_argument("--tokenizer", default=None, help="a tokenizer directory to copy alongside")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier export in out_dir: only the files its ember_export.json lists; other files there are "
        "left alone, and a directory without that file is still refused",
    )
    c.set_defaults(func=_cmd_convert)

    q = sub.add_parser("inspect", help="describe token shards (any supported format) and validate them")
    q.add_argument("paths", nargs="+", help="shard files, Megatron prefixes or directories")
    q.add_argument("--check-tokens", action="store_true", help="also check every token id against the vocabulary")
    q.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --check-tokens (default: as recorded)")
    q.set_defaults(func=_cmd_inspect)

    r = sub.add_parser(
        "prepare",
        help="tokenize text corpora (.txt, .jsonl, .parquet, .gz, .zst) into token shards",
        description="Tokenizes INPUTs (files, directories, globs, builtin:stdlib) into Ember shards under --output "
        "(train/, validation/, manifest.json); or prepares what a YAML config's data.prepare section names "
        "(`ember prepare CONFIG.yaml [data.prepare.KEY=VALUE ...]`). An interrupted run resumes when started again. "
        "See docs/prepare.md.",
    )
    r.add_argument("sources", nargs="+", metavar="INPUT", help="files, directories, globs or builtin:stdlib; or CONFIG.yaml then KEY=VALUE overrides")
    r.add_argument("-o", "--output", default=None, help="directory to write (must not hold a finished preparation)")
    r.add_argument("--tokenizer", default=None, help="'byte' (default), a tokenizer.json, or a Hugging Face tokenizer directory")
    r.add_argument("--shard-tokens", type=int, default=None, help="close a shard once it holds this many tokens (default 100,000,000)")
    split = r.add_mutually_exclusive_group()
    split.add_argument("--validation-fraction", type=float, default=None, help="fraction of documents, evenly spread, for validation/")
    split.add_argument("--validation-count", type=int, default=None, help="the first N documents go to validation/")
    r.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None, help="add / omit the BOS token (default: as the tokenizer does)")
    r.add_argument("--eos", action=argparse.BooleanOptionalAction, default=None, help="add / omit the EOS token (default: as the tokenizer does)")
    r.add_argument("--text-field", default=None, help="JSON key / Parquet column holding the text (default: text)")
    r.add_argument("--txt-mode", choices=("file", "line", "paragraph"), default=None, help=".txt documents: whole file (default), line, or paragraph")
    r.add_argument("--skip-bad", action="store_true", default=None, help="skip and count malformed records instead of stopping at the first")
    r.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: one per core); the output does not depend on it")
    r.add_argument("--overwrite", action="store_true", help="replace a finished output, or discard an interrupted one")
    r.add_argument("--library-tokenizer", action="store_true",
                   help="encode with the tokenizers library even where Ember's native byte-level BPE applies (same ids, slower)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_prepare)

    d = sub.add_parser("demo", help="tokenize the standard library into shards and stream batches from them")
    d.add_argument("--out", default=None, help="cache directory for the shards (default: a temporary directory)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--steps", type=int, default=500, help="batches to read")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "bench",
        help="run the benchmark suites of a source checkout and print one comparison table",
        description="Runs benchmarks/ of the current directory (or of the source tree Ember was installed from; "
        "the suites are not in the wheel) with pytest-benchmark, then prints one table: Ember against the "
        "baselines measured in the same run. See BENCHMARKS.md.",
    )
    # The suites are listed in benchmarks/report.py, beside them; a name is checked there when the command runs.
    b.add_argument("--suite", default="all", metavar="SUITE",
                   help="a suite that benchmarks/report.py names (BENCHMARKS.md lists them), or all (default)")
    b.add_argument("--small", action="store_true", help="smoke sizes (EMBER_BENCH_SMALL=1): every code path, figures not meaningful")
    b.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="where pytest-benchmark's JSON goes (default: .benchmarks/ember-bench-SUITE-TIME.json); "
        "the table's rows go beside it, NAME.table.json for NAME.json",
    )
    b.set_defaults(func=_cmd_bench)
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
    except (ValueError, OSError) as e:  # OSError: a full disk, a missing file, a permission
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from ember.train.orchestrator import TrainingDiverged
        from ember.train.preemption import Preempted

        if isinstance(e, Preempted):
            print(f"ember {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        if not isinstance(e, TrainingDiverged):
            raise
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
