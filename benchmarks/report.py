"""The benchmark suites of ``ember bench`` and the one comparison table their results make.

``ember bench`` (``python/ember/bench.py``, in the wheel) finds this directory, runs pytest on
a suite's files here (:data:`SUITES`) with ``--benchmark-json``, and hands that JSON to
:func:`report_run`. ``benchmarks/gpu/summary.py`` builds the same table from the GPU check's
JSON, and ``python benchmarks/report.py JSON...`` prints it for any pytest-benchmark JSON.
Standard library only, so that it loads without the suites' dependencies.

Each suite stores its figures in pytest-benchmark's ``extra_info`` in its own shape; one adapter
per benchmark file turns them into :class:`Row` s of a single table: Ember's figure, the baseline
measured in the same run, the speed-up, and the achieved rate (GB/s, TFLOP/s, MFU) where the
suite has a byte or FLOP model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# suite -> its pytest files in this directory; `ember bench --suite` takes these names, or "all".
SUITES: dict[str, tuple[str, ...]] = {
    "loader": ("test_loader.py",),
    "kernels": (
        "test_kernel_rms_norm.py",
        "test_kernel_rotary.py",
        "test_kernel_swiglu.py",
        "test_kernel_cross_entropy.py",
        "test_kernel_fused_linear_cross_entropy.py",
    ),
    "prepare": ("test_prepare.py",),
    "train": ("test_train_step.py",),
    "e2e": ("test_e2e.py",),
}


def suite_files(suite: str, bench_dir: Path) -> list[Path]:
    """The files of ``suite`` (or of every suite for ``"all"``) in ``bench_dir``, each checked to exist."""
    if suite != "all" and suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; {Path(__file__)} names {', '.join([*SUITES, 'all'])}")
    names = [f for s in SUITES for f in SUITES[s]] if suite == "all" else list(SUITES[suite])
    missing = [n for n in names if not (bench_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{bench_dir}: missing {', '.join(missing)} (suite {suite!r}); is the checkout complete?")
    return [bench_dir / n for n in names]


# -- the table ---------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the comparison table. ``ratio`` is Ember's speed-up over the baseline
    (> 1: Ember is faster), whatever the unit; ``of_ceiling`` is Ember's rate over the
    suite's measured ceiling (a copy, one matmul, a NumPy loop, the tokenizer alone)."""

    suite: str
    name: str
    unit: str
    ours: float | None
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    rate: str = ""
    of_ceiling: float | None = None
    notes: str = ""


_LOWER_IS_BETTER = {"ms", "us", "s"}


def _speedup(ours: float | None, baseline: float | None, unit: str) -> float | None:
    if not ours or not baseline:
        return None
    return baseline / ours if unit in _LOWER_IS_BETTER else ours / baseline


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "tok/s":
        return f"{value:,.0f} {unit}"
    digits = {"ms": 3, "us": 1, "Mtok/s": 1, "MB/s": 2}.get(unit, 2)
    return f"{value:,.{digits}f} {unit}"


def _cores(*infos: dict) -> str:
    other = max(i.get("other_cpu_cores", 0.0) or 0.0 for i in infos)
    return f"other CPU {other:.2f}" + (" (busy machine: figures depressed)" if other > 0.2 else "")


def _by_name(entries: list[dict]) -> dict[str, dict]:
    return {e["name"]: e["extra_info"] for e in entries}


def loader_rows(entries: list[dict]) -> list[Row]:
    by = _by_name(entries)
    ours = by.get("test_a_token_loader")
    ceiling = by.get("test_d_numpy_ceiling")
    mtok = lambda info: None if info is None else info["tokens_per_s"] / 1e6

    def of_ceiling(info):
        return None if info is None or ceiling is None else info["tokens_per_s"] / ceiling["tokens_per_s"]

    rows = []
    for name in ("test_b_memmap_dataloader", "test_c_nanogpt[memmap-per-batch]", "test_c_nanogpt[memmap-once]"):
        base = by.get(name)
        if base is None:
            continue
        rows.append(Row(
            "loader", f"TokenLoader vs {base['label']}", "Mtok/s", mtok(ours), mtok(base), base["label"].split(" ")[0],
            _speedup(mtok(ours), mtok(base), "Mtok/s"), "" if ours is None else f"{ours['gb_per_s_model']:.2f} GB/s r+w",
            of_ceiling(ours), _cores(*(i for i in (ours, base) if i)),
        ))
    for name, info in by.items():
        if name.startswith("test_a_token_loader_settings"):
            rows.append(Row(
                "loader", info["label"], "Mtok/s", mtok(info), mtok(ours), "(a) defaults",
                _speedup(mtok(info), mtok(ours), "Mtok/s"), f"{info['gb_per_s_model']:.2f} GB/s r+w", of_ceiling(info), _cores(info),
            ))
    consumer = by.get("test_e_consumer_cost")
    if consumer:
        rows.append(Row(
            "loader", "TokenLoader time inside next(), median", "us", consumer["median_us"], consumer["target_us"], "target",
            _speedup(consumer["median_us"], consumer["target_us"], "us"),
            notes=f"p90 {consumer['p90_us']:.1f} us, p99 {consumer['p99_us']:.1f} us; {_cores(consumer)}",
        ))
    for name, info in by.items():
        if name.startswith("test_f_startup"):
            rows.append(Row(
                "loader", f"start-up to 1st batch, {info['label']}", "ms", info["first_batch_s"] * 1e3,
                notes=f"constructor {info['ctor_s'] * 1e3:.1f} ms; RSS {info['rss_first_kb'] / 1024:+.1f} MB at the 1st batch",
            ))
    return rows


def _kernel_row(suite: str, name: str, providers: dict[str, tuple[float, float]], unit: str, ceiling: float | None) -> Row:
    """``providers``: provider -> (ms, rate in ``unit``), Ember's under "ember"."""
    ember = providers.get("ember")
    baselines = {p: v for p, v in providers.items() if p != "ember"}
    best = min(baselines, key=lambda p: baselines[p][0]) if baselines else None
    others = ", ".join(f"{p} {ms:.3f}" for p, (ms, _) in sorted(baselines.items(), key=lambda kv: kv[1][0]))
    return Row(
        suite, name, "ms",
        None if ember is None else ember[0],
        None if best is None else baselines[best][0],
        best or "",
        _speedup(None if ember is None else ember[0], None if best is None else baselines[best][0], "ms"),
        "" if ember is None else f"{ember[1]:,.1f} {unit}",
        None if ember is None or not ceiling else ember[1] / ceiling,
        ("baselines ms: " + others if others else "") + ("" if ember else "; ember not measured (GPU only)"),
    )


def elementwise_kernel_rows(entries: list[dict]) -> list[Row]:
    """RMSNorm, rotary, SwiGLU: kernel_bench_common.measure_pass's figures, against test_copy_ceiling."""
    ceiling = next((e["extra_info"].get("gb_per_s") for e in entries if e["name"] == "test_copy_ceiling"), None)
    groups: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for e in entries:
        info = e["extra_info"]
        if "workload" in info:
            groups.setdefault((info["label"], info["which"]), {})[info["provider"]] = (info["ms"], info["gb_per_s"])
    return [_kernel_row("kernels", f"{label} {which}", p, "GB/s", ceiling) for (label, which), p in groups.items()]


def loss_kernel_rows(entries: list[dict]) -> list[Row]:
    """Cross-entropy and fused linear cross-entropy: kernel_bench_common.measure's figures, keyed op/mode/provider."""
    infos = [e["extra_info"] for e in entries if "key" in e["extra_info"]]
    ceilings = {i["key"].split("/")[0]: i["rate"] for i in infos if i["key"].endswith("/ceiling")}
    groups: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    units: dict[str, str] = {}
    for i in infos:
        parts = i["key"].split("/")
        if len(parts) == 3:
            op, mode, provider = parts
            groups.setdefault((op, mode), {})[provider] = (i["ms_median"], i["rate"])
            units[op] = i["unit"]
    names = {"ce": "cross_entropy", "flce": "fused_linear_cross_entropy"}
    dtype = next((str(i.get("dtype", "")).removeprefix("torch.") for i in infos), "")
    return [
        _kernel_row("kernels", f"{names.get(op, op)} {dtype} {mode}", p, units[op], ceilings.get(op))
        for (op, mode), p in groups.items()
    ]


def train_step_rows(entries: list[dict]) -> list[Row]:
    rows = []
    for e in entries:
        i = e["extra_info"]
        if "ember_tokens_per_s" not in i:
            continue
        rows.append(Row(
            "train", f"train step, {i['label']}, {i['batch_size']}x{i['seq_len']}", "tok/s", i["ember_tokens_per_s"],
            i["hf_tokens_per_s"], "HF LlamaForCausalLM", i["ratio_ember_over_hf"], f"{i['ember_gflop_per_s']:.1f} GFLOP/s",
            notes=f"CPU fp32, {i['torch_threads']} threads; other CPU {i['other_cpu_cores_median']:.2f}",
        ))
    return rows


def prepare_rows(entries: list[dict]) -> list[Row]:
    by = _by_name(entries)
    ours, base = by.get("test_ember_prepare"), by.get("test_datasets_pipeline")
    ceiling = by.get("test_ceiling_tokenizer_in_memory[encode_batch]")
    fast = by.get("test_ceiling_tokenizer_in_memory[encode_batch_fast]")
    if ours is None and base is None:
        return []
    mb = lambda i: None if i is None else i["mb_per_s"]
    notes = [] if fast is None or ours is None else [f"x (a') encode_batch_fast {ours['mb_per_s'] / fast['mb_per_s']:.2f}"]
    return [Row(
        "prepare", "ember prepare vs datasets load_dataset+map+np", "MB/s", mb(ours), mb(base), "datasets",
        _speedup(mb(ours), mb(base), "MB/s"), "" if ours is None else f"{ours['mb_per_s']:.2f} MB/s of text",
        None if ours is None or ceiling is None else ours["mb_per_s"] / ceiling["mb_per_s"],
        "; ".join(notes + [_cores(*(i for i in (ours, base) if i))]),
    )]


def e2e_rows(entries: list[dict]) -> list[Row]:
    infos = {e["extra_info"]["variant"]: e["extra_info"] for e in entries if "variant" in e["extra_info"]}
    hf = infos.get("hf")
    rows = []
    if set(infos) == {"hf"}:
        return [Row("e2e", f"{hf['preset']} {hf['batch_size']}x{hf['seq_len']} {hf['precision']} (Ember not measured)",
                    "tok/s", None, hf["tokens_per_s"], "HF LlamaForCausalLM")]
    for variant, i in infos.items():
        if variant == "hf":
            continue
        mfu = i.get("mfu")
        peak = i.get("peak_memory_gb")
        hf_peak = None if hf is None else hf.get("peak_memory_gb")
        notes = [] if peak is None else [f"peak {peak:.1f} GB" + ("" if hf_peak is None else f" (HF {hf_peak:.1f} GB)")]
        if i.get("mfu_full_attention") is not None:
            notes.append(f"MFU with 12x attention {i['mfu_full_attention']:.1%}")
        notes.append(f"{i['step_ms_median']:.1f} ms/step, 1st step {i['first_step_s']:.1f} s")
        rows.append(Row(
            "e2e", f"{i['preset']} {variant}, {i['batch_size']}x{i['seq_len']} {i['precision']}", "tok/s", i["tokens_per_s"],
            None if hf is None else hf["tokens_per_s"], "" if hf is None else "HF LlamaForCausalLM",
            None if hf is None else i["tokens_per_s"] / hf["tokens_per_s"],
            f"MFU {mfu:.1%}" if mfu is not None else f"{i['tflops_per_s'] * 1e3:,.1f} GFLOP/s",
            notes="; ".join(notes),
        ))
    return rows


# benchmark file -> adapter from its entries (pytest-benchmark "benchmarks" items) to rows.
# The kernel suite had two files before it had one per op; their names stay, so that JSON
# recorded then still reads (their figures have the same shape).
ADAPTERS: dict[str, Callable[[list[dict]], list[Row]]] = {
    "test_loader.py": loader_rows,
    "test_kernel_rms_norm.py": elementwise_kernel_rows,
    "test_kernel_rotary.py": elementwise_kernel_rows,
    "test_kernel_swiglu.py": elementwise_kernel_rows,
    "test_kernel_cross_entropy.py": loss_kernel_rows,
    "test_kernel_fused_linear_cross_entropy.py": loss_kernel_rows,
    "test_kernels_norm_rope.py": elementwise_kernel_rows,
    "test_kernels_ce.py": loss_kernel_rows,
    "test_train_step.py": train_step_rows,
    "test_prepare.py": prepare_rows,
    "test_e2e.py": e2e_rows,
}


def rows_from_benchmarks(entries: Iterable[dict]) -> list[Row]:
    """Rows for pytest-benchmark entries (its JSON's ``benchmarks`` list), in the order of ADAPTERS."""
    by_file: dict[str, list[dict]] = {}
    for e in entries:
        by_file.setdefault(Path(e["fullname"].split("::")[0]).name, []).append(e)
    return [row for file, adapter in ADAPTERS.items() if file in by_file for row in adapter(by_file[file])]


def format_table(rows: Sequence[Row]) -> str:
    header = ("suite", "benchmark", "Ember", "baseline", "speed-up", "rate", "x ceiling", "notes")
    lines = [
        (
            r.suite,
            r.name,
            _fmt(r.ours, r.unit),
            "-" if r.baseline is None else f"{_fmt(r.baseline, r.unit)} {r.baseline_name}".strip(),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.rate or "-",
            "-" if r.of_ceiling is None else f"{r.of_ceiling:.2f}",
            r.notes,
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    right = {2, 3, 4, 5, 6}

    def fmt(cells):
        return "  ".join(c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    out.append(
        "speed-up: Ember over the baseline named, measured in the same run (kernels: the fastest of those measured; "
        "> 1: Ember faster); rate: Ember's GB/s, TFLOP/s or MFU by the suite's byte or FLOP model; "
        "x ceiling: that rate over the suite's measured ceiling"
    )
    return "\n".join(out)


def write_rows(rows: Sequence[Row], path: Path, **meta: Any) -> None:
    path.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def rows_path(json_path: Path) -> Path:
    """Where the table's rows go: beside pytest-benchmark's JSON, ``NAME.table.json``."""
    return json_path.with_name(json_path.name.removesuffix(".json") + ".table.json")


def report_run(json_path: Path, *, suite: str, small: bool) -> tuple[str, Path]:
    """The table of one ``ember bench`` run from pytest-benchmark's JSON at ``json_path``, and
    where its rows were written (:func:`rows_path`, with the run's suite, sizes and machine)."""
    report = json.loads(Path(json_path).read_text())
    rows = rows_from_benchmarks(report["benchmarks"])
    table_path = rows_path(Path(json_path))
    write_rows(rows, table_path, suite=suite, small=small, datetime=report.get("datetime"),
               machine=report.get("machine_info", {}), benchmark_json=str(json_path))  # fmt: skip
    return format_table(rows), table_path


def main(argv: Sequence[str]) -> int:
    """``python benchmarks/report.py JSON...``: the table of pytest-benchmark JSON files."""
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python benchmarks/report.py BENCHMARK.json...", file=sys.stderr)
        return 2
    entries = [e for path in argv for e in json.loads(Path(path).read_text())["benchmarks"]]
    rows = rows_from_benchmarks(entries)
    print(format_table(rows) if rows else "no figures Ember's adapters know in these files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
