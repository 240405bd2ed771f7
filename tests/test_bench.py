"""``ember bench``: runs a suite of the source checkout and prints one comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember import bench, cli

REPO = Path(__file__).resolve().parents[1]
report = bench.load_report(REPO / "benchmarks")  # the table's formatter lives beside the suites


@pytest.mark.slow
def test_bench_loader_small_prints_one_table_and_writes_its_rows(tmp_path, monkeypatch, capfd):
    pytest.importorskip("pytest_benchmark")
    monkeypatch.chdir(REPO)
    out = tmp_path / "loader.json"
    assert cli.main(["bench", "--suite", "loader", "--small", "--json", str(out)]) == 0

    printed = capfd.readouterr().out
    table = printed[printed.index("Ember benchmarks: suite loader (small sizes)") :]
    for name in (
        "TokenLoader vs (b) np.memmap + DataLoader, 2 workers",
        "TokenLoader vs (c) nanoGPT get_batch (memmap per batch)",
        "TokenLoader vs (c') nanoGPT get_batch, memmap opened once",
        "(a') TokenLoader 1 thread, prefetch 4",
        "TokenLoader time inside next(), median",
        "start-up to 1st batch, dir of 1,000 shards",
    ):
        assert name in table

    assert json.loads(out.read_text())["benchmarks"]  # pytest-benchmark's own report
    saved = json.loads(out.with_name("loader.table.json").read_text())
    assert saved["suite"] == "loader" and saved["small"] is True
    rows = saved["rows"]
    assert len(rows) == 11  # 3 baselines, 3 settings, the consumer's cost, 4 start-up cases
    comparisons = [r for r in rows if r["name"].startswith("TokenLoader vs")]
    assert len(comparisons) == 3
    for r in comparisons:
        assert r["unit"] == "Mtok/s" and r["ours"] > 0 and r["baseline"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])
        assert r["of_ceiling"] > 0 and "GB/s" in r["rate"]


def test_bench_outside_a_checkout_says_where_the_suites_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "installed_source_roots", lambda: [tmp_path / "site-packages"])
    assert cli.main(["bench", "--suite", "loader"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember bench: error: no benchmarks/ directory")
    assert str(tmp_path) in err and "not shipped in the wheel" in err and "checkout" in err


def test_bench_finds_the_checkout_ember_was_installed_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.find_benchmarks_dir(roots=[tmp_path / "elsewhere", REPO]) == REPO / "benchmarks"


def test_bench_names_the_suites_for_an_unknown_one(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["bench", "--suite", "kernel"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember bench: error: unknown suite 'kernel'")
    assert "benchmarks/report.py" in err and all(name in err for name in (*report.SUITES, "all"))


def test_every_suite_file_exists_and_has_an_adapter():
    files = report.suite_files("all", REPO / "benchmarks")
    assert len(files) == len({f.name for f in files})
    assert all(f.name in report.ADAPTERS for f in files)


def _entry(file: str, name: str, **info) -> dict:
    return {"name": name, "fullname": f"benchmarks/{file}::{name}", "extra_info": info}


# test_kernels_norm_rope.py: the file's name before one file per op, in JSON recorded then.
@pytest.mark.parametrize("norm", ["test_kernel_rms_norm.py", "test_kernels_norm_rope.py"])
def test_kernel_rows_compare_ember_with_the_fastest_baseline(norm):
    entries = [
        _entry(norm, "test_copy_ceiling", gb_per_s=2000.0),
        *(
            _entry(norm, f"test_kernel[rms_norm-{p}-forward]", workload="rms_norm", label="rms_norm 16384x4096 bfloat16",
                   provider=p, which="forward", ms=ms, gb_per_s=gbps)
            for p, ms, gbps in (("ember", 1.0, 1500.0), ("torch", 3.0, 500.0), ("torch.compile", 2.0, 750.0))
        ),
    ]
    (row,) = report.rows_from_benchmarks(entries)
    assert row.name == "rms_norm 16384x4096 bfloat16 forward"
    assert (row.ours, row.baseline, row.baseline_name) == (1.0, 2.0, "torch.compile")
    assert row.ratio == pytest.approx(2.0) and row.of_ceiling == pytest.approx(0.75)
    line = report.format_table([row]).splitlines()[2]
    assert "1.000 ms" in line and "2.000 ms torch.compile" in line and "2.00x" in line and "1,500.0 GB/s" in line


# test_kernels_ce.py: the file's name before one file per op, in JSON recorded then.
@pytest.mark.parametrize("ce", ["test_kernel_cross_entropy.py", "test_kernels_ce.py"])
def test_loss_kernel_rows_compare_ember_with_the_fastest_baseline(ce):
    common = dict(unit="GB/s", dtype="torch.bfloat16")
    entries = [
        _entry(ce, "test_ce_copy_ceiling", key="ce/ceiling", ms_median=1.0, rate=3000.0, **common),
        *(
            _entry(ce, f"test_ce[{p}-fwd+bwd]", key=f"ce/fwd+bwd/{p}", ms_median=ms, rate=rate, **common)
            for p, ms, rate in (("ember", 2.0, 1500.0), ("torch", 8.0, 375.0), ("liger", 3.0, 1000.0))
        ),
    ]
    (row,) = report.rows_from_benchmarks(entries)
    assert row.name == "cross_entropy bfloat16 fwd+bwd"
    assert (row.ours, row.baseline, row.baseline_name) == (2.0, 3.0, "liger")
    assert row.ratio == pytest.approx(1.5) and row.of_ceiling == pytest.approx(0.5) and row.rate == "1,500.0 GB/s"


def test_e2e_rows_give_ratio_to_hf_and_mfu():
    common = dict(preset="llama3.2-1b", batch_size=4, seq_len=2048, precision="bf16-mixed", step_ms_median=800.0,
                  first_step_s=60.0, tflops_per_s=400.0, mfu_full_attention=0.45)
    entries = [
        _entry("test_e2e.py", "test_e2e[ember-compile]", variant="ember-compile", tokens_per_s=12000.0, mfu=0.42,
               peak_memory_gb=30.0, **common),
        _entry("test_e2e.py", "test_e2e[hf]", variant="hf", tokens_per_s=8000.0, mfu=0.28, peak_memory_gb=45.0, **common),
    ]
    (row,) = report.rows_from_benchmarks(entries)
    assert row.suite == "e2e" and "ember-compile" in row.name
    assert (row.ours, row.baseline, row.ratio) == (12000.0, 8000.0, 1.5)
    assert row.rate == "MFU 42.0%" and "peak 30.0 GB (HF 45.0 GB)" in row.notes
