"""``ember prepare``: text in, token shards out, as a user meets it.

Real tokenizers only: a BPE trained here with the ``tokenizers`` library, a
Llama-3-shaped tokenizer directory, and Ember's byte tokenizer. Every token stream
is checked against the tokenizer's own ``encode``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ember.data import PrepareError, TokenLoader, open_dataset, prepare
from ember.data.corpus import stdlib_texts
from ember.data.tokenizer import ByteTokenizer

prep = importlib.import_module("ember.data.prepare")  # the module; ember.data.prepare is the function
tokenizers = pytest.importorskip("tokenizers")


# -- corpora and tokenizers ------------------------------------------------------------


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """60 documents of real text (stdlib sources, cut to 8 KB), with some non-ASCII."""
    out = [t[:8000] for t in stdlib_texts(max_bytes=2_000_000) if t.strip()][:58]
    return out + ["naïve café — ünïcödé ✓ 日本語\nsecond line", "x = 1\n"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, texts) -> Path:
    """A byte-level BPE (vocabulary 2,000) that adds <s> ... </s> around each text, as a
    tokenizer directory with tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return d


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """Shaped like Llama 3's tokenizer: its pre-tokenizer regex, a vocabulary past 65,536
    (so uint32 shards), <|begin_of_text|> added by the post-processor and no EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({f"<|filler_{i}|>": len(alphabet) + i for i in range(70_000 - len(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=False))
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    d = tmp_path_factory.mktemp("llama3")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return d


def hf(path: Path):
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def write_txt_files(d: Path, texts: list[str]) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, t in enumerate(texts):
        p = d / f"doc{i:03d}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(p)
    return paths


def documents(path: Path) -> list[list[int]]:
    ds = open_dataset(path)
    return [ds[i].tolist() for i in range(len(ds))]


def byte_texts(path: Path, bos: bool = True, eos: bool = True) -> list[str]:
    """Documents of a byte-tokenized split, as text (BOS/EOS checked and stripped)."""
    out = []
    for ids in documents(path):
        if bos:
            assert ids[0] == ByteTokenizer.BOS
            ids = ids[1:]
        if eos:
            assert ids[-1] == ByteTokenizer.EOS
            ids = ids[:-1]
        out.append(bytes(ids).decode("utf-8"))
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def is_validation(i: int, fraction: float) -> bool:
    """The documented split rule, written independently: validation when floor((i+1) f) > floor(i f)."""
    from fractions import Fraction

    f = Fraction(str(fraction))
    return int((i + 1) * f) > int(i * f)


# -- token streams ------------------------------------------------------------------------


def test_bpe_shards_hold_the_tokenizers_own_ids(tmp_path, texts, bpe_dir):
    paths = write_txt_files(tmp_path / "corpus", texts)
    m = prepare(tmp_path / "corpus", tmp_path / "out", tokenizer=bpe_dir, shard_tokens=3000, validation_fraction=0.1)
    tok = hf(bpe_dir)
    expected = {"train": [], "validation": []}
    for i, p in enumerate(paths):
        expected["validation" if is_validation(i, 0.1) else "train"].append(tok.encode(p.read_text(encoding="utf-8")).ids)
    assert expected["train"][0][0] == 0 and expected["train"][0][-1] == 1  # the tokenizer adds <s> ... </s> itself
    for split in ("train", "validation"):
        assert documents(tmp_path / "out" / split) == expected[split]
        s = m["splits"][split]
        assert s["documents"] == len(expected[split])
        assert s["tokens"] == sum(map(len, expected[split]))
        files = sorted((tmp_path / "out" / split).iterdir())
        assert [sh["path"] for sh in s["shards"]] == [f"{split}/{f.name}" for f in files]
        for shard in s["shards"]:
            ds = open_dataset(tmp_path / "out" / shard["path"])
            assert (len(ds), ds.num_tokens, ds.vocab_size) == (shard["documents"], shard["tokens"], 2000)
        # Every shard but the last reached shard_tokens; none is bigger than it needs to be.
        assert all(sh["tokens"] >= 3000 for sh in s["shards"][:-1])
    assert len(m["splits"]["train"]["shards"]) > 3
    assert m["totals"]["documents"] == len(texts) and m["totals"]["files"] == len(texts)
    assert m["totals"]["tokens"] == sum(map(len, expected["train"] + expected["validation"]))
    assert m["totals"]["text_bytes"] == sum(len(t.encode()) for t in texts)
    t = m["tokenizer"]
    assert t["vocab_size"] == 2000 and t["bos_id"] == 0 and t["eos_id"] == 1
    assert t["fingerprint"] == "sha256:" + hashlib.sha256(tok.to_str().encode()).hexdigest()
    assert m["dtype"] == "uint16"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert not (tmp_path / "out" / "progress.json").exists()


@pytest.mark.parametrize("bos, eos", [(None, None), (False, True), (True, False), (False, False)])
def test_byte_tokenizer_with_bos_eos_as_configured(tmp_path, texts, bos, eos):
    write_txt_files(tmp_path / "corpus", texts[:10])
    prepare(tmp_path / "corpus", tmp_path / "out", bos=bos, eos=eos)
    want_bos, want_eos = bos is not False, eos is not False  # the byte tokenizer adds both by default
    expected = [ByteTokenizer().encode(t, bos=want_bos, eos=want_eos) for t in texts[:10]]
    assert documents(tmp_path / "out" / "train") == expected


def test_llama3_style_directory_bos_by_default_eos_on_request(tmp_path, texts, llama3_dir):
    write_txt_files(tmp_path / "corpus", texts[:6])
    tok = hf(llama3_dir)
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    m = prepare(tmp_path / "corpus", tmp_path / "a", tokenizer=llama3_dir)
    expected = [tok.encode(t).ids for t in texts[:6]]
    assert expected[0][0] == bos and expected[0][-1] != eos
    assert documents(tmp_path / "a" / "train") == expected
    assert m["dtype"] == "uint32" and open_dataset(tmp_path / "a" / "train").dtype == np.uint32
    assert m["tokenizer"]["vocab_size"] == 70_002 and (m["tokenizer"]["bos_id"], m["tokenizer"]["eos_id"]) == (bos, eos)
    prepare(tmp_path / "corpus", tmp_path / "b", tokenizer=llama3_dir / "tokenizer.json", eos=True, bos=False)
    assert documents(tmp_path / "b" / "train") == [tok.encode(t, add_special_tokens=False).ids + [eos] for t in texts[:6]]


def test_bos_requested_from_a_tokenizer_without_one_is_refused(tmp_path, texts, llama3_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    tok.post_processor = None
    tok.save(str(tmp_path / "plain.json"))
    write_txt_files(tmp_path / "corpus", texts[:2])
    with pytest.raises(PrepareError, match="BOS is requested but the tokenizer defines no BOS token"):
        prepare(tmp_path / "corpus", tmp_path / "out", tokenizer=tmp_path / "plain.json", bos=True)


# -- inputs -------------------------------------------------------------------------


def test_every_input_kind(tmp_path, texts):
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    docs = [t for t in texts[:12]]
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)

    # .txt, one document per file, plain and compressed
    (src / "a.txt").write_text(docs[0], encoding="utf-8")
    (src / "sub" / "b.txt.gz").write_bytes(gzip.compress(docs[1].encode()))
    (src / "sub" / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[2].encode()))
    # .jsonl with a custom field, plain, gzip and zstd
    def jsonl(ds):
        return "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(ds)).encode()

    (src / "d.jsonl").write_bytes(jsonl(docs[3:5]))
    (src / "e.jsonl.gz").write_bytes(gzip.compress(jsonl(docs[5:7])))
    (src / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs[7:9])))
    # .parquet with the same custom column, plain and zstd-compressed
    pq.write_table(pa.table({"body": docs[9:11], "n": [1, 2]}), src / "g.parquet")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"body": [docs[11]]}), buf)
    (src / "h.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue().to_pybytes()))
    (src / "notes.md").write_text("not a corpus file: a directory search skips it")

    m = prepare(src, tmp_path / "out", text_field="body")
    # A directory is read in path order: a, d, e, f, g, h, then sub/b, sub/c.
    order = [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2]
    assert byte_texts(tmp_path / "out" / "train") == [docs[i] for i in order]
    assert [f["path"] for f in m["files"]] == [
        (src / n).as_posix() for n in ("a.txt", "d.jsonl", "e.jsonl.gz", "f.jsonl.zst", "g.parquet", "h.parquet.zst", "sub/b.txt.gz", "sub/c.txt.zst")
    ]
    assert [f["documents"] for f in m["files"]] == [1, 2, 2, 2, 2, 1, 1, 1]

    # Globs and explicit files, in the order given; a file named twice is read once.
    m = prepare([str(src / "*.jsonl*"), src / "a.txt", str(src / "**" / "a.txt")], tmp_path / "glob", text_field="body")
    assert byte_texts(tmp_path / "glob" / "train") == [docs[i] for i in (3, 4, 5, 6, 7, 8, 0)]


def test_txt_line_and_paragraph_modes(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"first para, line one\nline two\r\n\n  \n\nsecond para\n\n\nthird\nend\n   \n")
    prepare(tmp_path / "t.txt", tmp_path / "para", txt_mode="paragraph")
    assert byte_texts(tmp_path / "para" / "train") == ["first para, line one\nline two", "second para", "third\nend"]
    m = prepare(tmp_path / "t.txt", tmp_path / "line", txt_mode="line")
    assert byte_texts(tmp_path / "line" / "train") == ["first para, line one", "line two", "second para", "third", "end"]
    assert m["totals"]["skipped_empty"] == 6  # blank and whitespace-only lines are not documents
    prepare(tmp_path / "t.txt", tmp_path / "file")
    assert byte_texts(tmp_path / "file" / "train") == [(tmp_path / "t.txt").read_bytes().decode()]  # kept exactly


def test_builtin_stdlib_corpus_is_prepared_by_the_pipeline(tmp_path):
    from ember.data.builtin import stdlib_shards

    train_dir, _ = stdlib_shards(tmp_path)
    root = train_dir.parent
    assert stdlib_shards(tmp_path) == (train_dir, root / "validation")  # built once, then reused
    m = json.loads((root / "manifest.json").read_text())
    assert m["format"] == "ember-prepare" and m["inputs"] == ["builtin:stdlib"] and m["tokenizer"]["kind"] == "byte"
    assert m["options"]["validation_fraction"] == 0.02
    # The same documents as the corpus module yields (those not empty), in the same order.
    texts = [t for t in stdlib_texts() if t.strip()]
    assert m["totals"]["documents"] == len(texts)
    train = open_dataset(root / "train")
    val_every = 50
    train_texts = [t for i, t in enumerate(texts) if i % val_every != val_every - 1]
    for i in (0, 1, len(train) // 2, len(train) - 1):
        assert train[i].tolist() == ByteTokenizer().encode(train_texts[i])
    assert len(open_dataset(root / "validation")) == len(texts) // val_every
    batch = next(iter(TokenLoader(root / "train", seq_len=32, batch_size=2, seed=0)))
    assert batch["input_ids"].shape == (2, 32)


# -- parallelism and determinism ----------------------------------------------------


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path, texts, bpe_dir, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_BYTES", 20_000)  # many batches in flight, finishing out of order
    write_txt_files(tmp_path / "corpus", texts)
    for workers in (1, 2, 3):
        prepare(tmp_path / "corpus", tmp_path / f"w{workers}", tokenizer=bpe_dir, shard_tokens=4000,
                validation_fraction=0.05, workers=workers)
    one = tree(tmp_path / "w1")
    assert len(one) > 5 and "manifest.json" in one
    assert tree(tmp_path / "w2") == one
    assert tree(tmp_path / "w3") == one


def test_native_bpe_and_the_library_write_the_same_shards(tmp_path, texts, bpe_dir):
    texts = [*texts, "a document that spells out <s> and </s> as text", "and </s> again"]  # these go to the library
    write_txt_files(tmp_path / "corpus", texts)
    outs = {}
    for native in (True, False):
        outs[native] = tmp_path / f"native-{native}"
        prepare(tmp_path / "corpus", outs[native], tokenizer=bpe_dir, shard_tokens=4000, native_bpe=native)
    manifests = {n: json.loads((o / "manifest.json").read_text()) for n, o in outs.items()}
    assert manifests[True]["encoded_by"]["engine"] == "native"
    assert manifests[False]["encoded_by"] == {"engine": "tokenizers", "note": "native BPE switched off (--library-tokenizer)"}
    assert manifests[True]["encoded_by"]["library_documents"] == 2
    same = {n: {k: v for k, v in tree(o).items() if k != "manifest.json"} for n, o in outs.items()}
    assert len(same[True]) > 3 and same[True] == same[False]
    assert {k: v for k, v in manifests[True].items() if k != "encoded_by"} == {k: v for k, v in manifests[False].items() if k != "encoded_by"}


def test_tokenizer_calls_run_on_the_worker_threads_in_parallel(tmp_path, texts, bpe_dir, monkeypatch):
    """Worker threads, not the library's pool, carry the parallelism: each call is single-threaded."""
    monkeypatch.setattr(prep, "BATCH_BYTES", 20_000)
    seen = {"threads": set(), "parallelism": set()}
    encoders = importlib.import_module("ember.data.encoders")
    original = encoders.HFEncoder.encode_batch

    def spy(self, batch):
        seen["threads"].add(threading.current_thread().name)
        seen["parallelism"].add(os.environ.get("TOKENIZERS_PARALLELISM"))
        return original(self, batch)

    monkeypatch.setattr(encoders.HFEncoder, "encode_batch", spy)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    write_txt_files(tmp_path / "corpus", texts)
    prepare(tmp_path / "corpus", tmp_path / "out", tokenizer=bpe_dir, workers=2)
    assert len(seen["threads"]) == 2 and all(n.startswith("ember-prepare") for n in seen["threads"])
    assert seen["parallelism"] == {"false"}
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before


# -- resuming ---------------------------------------------------------------------------


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    args = ["builtin:stdlib", "--shard-tokens", "1000000", "--workers", "1", "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ember", "prepare", *args, "-o", str(out)], stderr=subprocess.PIPE)
    recorded: list[dict] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            recorded = json.loads((out / "progress.json").read_text())["splits"]["train"]
        except (OSError, ValueError, KeyError):
            recorded = []
        if len(recorded) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "manifest.json").exists() and len(recorded) >= 3
    kept = {s["path"]: (out / s["path"]).stat() for s in recorded}

    m = prepare("builtin:stdlib", out, shard_tokens=1_000_000, workers=2)  # resumes (any worker count)
    prepare("builtin:stdlib", tmp_path / "straight", shard_tokens=1_000_000, workers=1)
    assert tree(out) == tree(tmp_path / "straight")
    assert len(m["splits"]["train"]["shards"]) > len(recorded) + 3
    for path, st in kept.items():  # completed shards were kept, not rewritten
        now = (out / path).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


class Boom(RuntimeError):
    pass


def fail_after(monkeypatch, calls: int) -> None:
    encoders = importlib.import_module("ember.data.encoders")
    original = encoders.HFEncoder.encode_batch
    count = {"n": 0}
    lock = threading.Lock()

    def failing(self, batch):
        with lock:
            count["n"] += 1
            n = count["n"]
        if n == calls:
            raise Boom("tokenizer crashed")
        return original(self, batch)

    monkeypatch.setattr(encoders.HFEncoder, "encode_batch", failing)


def test_resume_after_a_failure_with_a_validation_split(tmp_path, texts, bpe_dir, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_BYTES", 4000)  # about one document per tokenizer call
    write_txt_files(tmp_path / "corpus", texts)
    opts = dict(tokenizer=bpe_dir, shard_tokens=2500, validation_fraction=0.2, workers=2)
    prepare(tmp_path / "corpus", tmp_path / "straight", **opts)

    with monkeypatch.context() as mp:
        fail_after(mp, 30)
        with pytest.raises(Boom):
            prepare(tmp_path / "corpus", tmp_path / "out", **opts)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["splits"]["train"] and progress["splits"]["validation"]
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # the open shards' temporary files were removed

    # Changed options or inputs are refused, naming what changed.
    with pytest.raises(PrepareError, match=r"validation_fraction 0\.2 -> 0\.3.*--overwrite"):
        prepare(tmp_path / "corpus", tmp_path / "out", **{**opts, "validation_fraction": 0.3})
    with pytest.raises(PrepareError, match="interrupted preparation.*tokenizer"):
        prepare(tmp_path / "corpus", tmp_path / "out", **{**opts, "tokenizer": "byte"})

    # What a SIGKILL can leave: temporary files of the progress record and of a shard.
    (tmp_path / "out" / ".progress.json.tmp-999").write_text("{")
    (tmp_path / "out" / "train" / ".00042.tok.tmp-999").write_bytes(b"partial")
    prepare(tmp_path / "corpus", tmp_path / "out", **{**opts, "workers": 1})
    assert tree(tmp_path / "out") == tree(tmp_path / "straight")


def test_changed_input_file_blocks_resume_until_overwrite(tmp_path, texts, bpe_dir, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_BYTES", 4000)  # about one document per tokenizer call
    paths = write_txt_files(tmp_path / "corpus", texts)
    opts = dict(tokenizer=bpe_dir, shard_tokens=2500, workers=1)
    with monkeypatch.context() as mp:
        fail_after(mp, 30)
        with pytest.raises(Boom):
            prepare(tmp_path / "corpus", tmp_path / "out", **opts)
    paths[3].write_text("edited since", encoding="utf-8")
    with pytest.raises(PrepareError, match=f"modified: {paths[3].as_posix()}"):
        prepare(tmp_path / "corpus", tmp_path / "out", **opts)
    m = prepare(tmp_path / "corpus", tmp_path / "out", overwrite=True, **opts)
    assert m["totals"]["documents"] == len(texts)
    assert documents(tmp_path / "out" / "train")[3] == hf(bpe_dir).encode("edited since").ids


def test_finished_output_is_never_silently_replaced(tmp_path, texts):
    write_txt_files(tmp_path / "corpus", texts[:5])
    prepare(tmp_path / "corpus", tmp_path / "out")
    before = tree(tmp_path / "out")
    with pytest.raises(PrepareError, match="already holds a finished preparation.*--overwrite"):
        prepare(tmp_path / "corpus", tmp_path / "out", validation_count=1)
    assert tree(tmp_path / "out") == before
    m = prepare(tmp_path / "corpus", tmp_path / "out", validation_count=1, overwrite=True)
    assert m["splits"]["validation"]["documents"] == 1 and tree(tmp_path / "out") != before
    # Two runs never write one output at once.
    import fcntl

    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PrepareError, match="being written by another ember prepare run"):
            prepare(tmp_path / "corpus", tmp_path / "busy")
    # A directory ember prepare did not write is refused even with overwrite.
    (tmp_path / "other" / "train").mkdir(parents=True)
    with pytest.raises(PrepareError, match="not written by ember prepare"):
        prepare(tmp_path / "corpus", tmp_path / "other", overwrite=True)


# -- splits -----------------------------------------------------------------------------


def test_split_by_fraction_and_by_count(tmp_path, texts):
    write_txt_files(tmp_path / "corpus", texts[:20])
    m = prepare(tmp_path / "corpus", tmp_path / "frac", validation_fraction=0.25)
    assert byte_texts(tmp_path / "frac" / "validation") == [texts[i] for i in (3, 7, 11, 15, 19)]
    assert byte_texts(tmp_path / "frac" / "train") == [t for i, t in enumerate(texts[:20]) if i % 4 != 3]
    assert (m["splits"]["validation"]["documents"], m["splits"]["train"]["documents"]) == (5, 15)
    m = prepare(tmp_path / "corpus", tmp_path / "count", validation_count=3)
    assert byte_texts(tmp_path / "count" / "validation") == texts[:3]
    assert byte_texts(tmp_path / "count" / "train") == texts[3:20]
    m = prepare(tmp_path / "corpus", tmp_path / "none")
    assert m["splits"]["validation"] == {"documents": 0, "tokens": 0, "shards": []}
    assert not (tmp_path / "none" / "validation").exists()
    with pytest.raises(PrepareError, match="nothing is left for training"):
        prepare(tmp_path / "corpus", tmp_path / "all", validation_count=20)
    with pytest.raises(PrepareError, match="not both"):
        prepare(tmp_path / "corpus", tmp_path / "x", validation_count=2, validation_fraction=0.1)


# -- bad input ---------------------------------------------------------------------------


def test_bad_records_are_reported_with_file_and_line(tmp_path):
    good = json.dumps({"text": "fine"})
    cases = {
        "malformed.jsonl": (f"{good}\n{good}\n{{\"text\": \"unterminated\n{good}\n".encode(), r"malformed.jsonl:3: malformed JSON"),
        "undecodable.jsonl": (f"{good}\n".encode() + b'{"text": "caf\xe9"}\n', r"undecodable.jsonl:2: bytes that are not UTF-8"),
        "notobject.jsonl": (f"{good}\n[1, 2]\n".encode(), r"notobject.jsonl:2: expected a JSON object"),
        "nulltext.jsonl": (f'{good}\n{good}\n{{"text": null}}\n'.encode(), r"nulltext.jsonl:3: field 'text' is null, not a string"),
        "surrogate.jsonl": (f'{good}\n{{"text": "a\\ud800b"}}\n'.encode(), r"surrogate.jsonl:2: .*unpaired surrogate"),
        "lines.txt": (b"one\ntwo\nthr\xffee\n", r"lines.txt:3: bytes that are not UTF-8"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PrepareError, match=pattern):
            prepare(tmp_path / name, tmp_path / f"out-{name}", txt_mode="line")
        # With skip_bad the record is skipped and counted; the rest is kept.
        m = prepare(tmp_path / name, tmp_path / f"skip-{name}", txt_mode="line", skip_bad=True)
        assert m["totals"]["skipped_bad"] == 1, name
        assert m["files"][0]["first_bad"].startswith(f"{(tmp_path / name).as_posix()}:")
    assert byte_texts(tmp_path / "skip-lines.txt" / "train") == ["one", "two"]
    assert byte_texts(tmp_path / "skip-malformed.jsonl" / "train") == ["fine"] * 3


def test_missing_field_and_column_are_errors_naming_them(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"content": "no text", "id": 7}\n')
    for skip_bad in (False, True):
        with pytest.raises(PrepareError, match=r"a.jsonl:2: no field 'text' in the record \(its fields: 'content', 'id'\)"):
            prepare(tmp_path / "a.jsonl", tmp_path / f"o{skip_bad}", skip_bad=skip_bad)
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(PrepareError, match=r"b.parquet: no column 'text' \(its columns: 'content'\)"):
        prepare(tmp_path / "b.parquet", tmp_path / "p")
    assert prepare(tmp_path / "b.parquet", tmp_path / "q", text_field="content")["totals"]["documents"] == 1


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "ok.txt").write_text("hello")
    with pytest.raises(PrepareError, match="empty.jsonl: no documents: the file is empty"):
        prepare(tmp_path / "empty.jsonl", tmp_path / "o1")
    with pytest.raises(PrepareError, match="blank.txt: no documents"):
        prepare([tmp_path / "ok.txt", tmp_path / "blank.txt"], tmp_path / "o2")
    with pytest.raises(PrepareError, match="no documents in the inputs"):
        prepare(tmp_path / "empty.jsonl", tmp_path / "o3", skip_bad=True)
    m = prepare([tmp_path / "ok.txt", tmp_path / "blank.txt"], tmp_path / "o4", skip_bad=True)
    assert m["totals"]["documents"] == 1 and m["totals"]["skipped_empty"] == 1
    with pytest.raises(PrepareError, match="no such file or directory"):
        prepare(tmp_path / "missing.txt", tmp_path / "o5")
    with pytest.raises(PrepareError, match="glob matches no"):
        prepare(str(tmp_path / "*.parquet"), tmp_path / "o6")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(PrepareError, match="unsupported file type"):
        prepare(tmp_path / "data.csv", tmp_path / "o7")
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(PrepareError, match="junk.jsonl.gz: cannot read it"):
        prepare(tmp_path / "junk.jsonl.gz", tmp_path / "o8")


def test_missing_optional_dependency_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pyarrow.compute", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(PrepareError, match=r"a.parquet: reading .parquet files needs the `pyarrow` package: pip install pyarrow"):
        prepare(tmp_path / "a.parquet", tmp_path / "o1")
    with pytest.raises(PrepareError, match=r"b.jsonl.zst: reading .zst files needs the `zstandard` package: pip install zstandard"):
        prepare(tmp_path / "b.jsonl.zst", tmp_path / "o2")


def test_tokenizer_errors(tmp_path, texts):
    write_txt_files(tmp_path / "corpus", texts[:2])
    with pytest.raises(PrepareError, match="no such file or directory"):
        prepare(tmp_path / "corpus", tmp_path / "o", tokenizer=tmp_path / "nope")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer.model").write_bytes(b"")
    with pytest.raises(PrepareError, match="no tokenizer.json.*save_pretrained"):
        prepare(tmp_path / "corpus", tmp_path / "o", tokenizer=tmp_path / "slow")


# -- CLI and config ----------------------------------------------------------------------


@pytest.fixture
def ember(capsys):
    """Runs the ``ember`` command line in process (the SIGKILL test runs the real one)."""
    from ember.cli import main

    def run(*args):
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def test_cli_prepares_refuses_and_reports(tmp_path, texts, ember):
    write_txt_files(tmp_path / "corpus", texts[:8])
    rc, out, err = ember("prepare", tmp_path / "corpus", "-o", tmp_path / "out", "--validation-count", "2", "--shard-tokens", "20000")
    assert rc == 0, err
    assert "prepared 8 documents" in out and "validation" in out
    assert byte_texts(tmp_path / "out" / "validation") == texts[:2]
    rc, out, err = ember("prepare", tmp_path / "corpus", "-o", tmp_path / "out")
    assert rc == 2 and "ember prepare: error: output" in err and "already holds a finished preparation" in err
    rc, out, err = ember("prepare", tmp_path / "corpus")
    assert rc == 2 and "--output DIR is required" in err


def test_config_data_prepare_for_prepare_and_train(tmp_path, texts, ember):
    write_txt_files(tmp_path / "corpus", texts[:10])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {preset: tiny}\n"
        "data:\n"
        "  seq_len: 32\n"
        f"  prepare: {{inputs: ['{tmp_path / 'corpus'}'], output: '{tmp_path / 'tokens'}', validation_fraction: 0.2}}\n"
    )
    rc, out, err = ember("prepare", cfg, "data.prepare.shard_tokens=5000", "--workers", "1")
    assert rc == 0, err
    m = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert m["options"]["shard_tokens"] == 5000 and m["splits"]["validation"]["documents"] == 2
    rc, out, err = ember("prepare", cfg, "--tokenizer", "x")
    assert rc == 2 and "data.prepare section" in err

    from ember.config import load_config
    from ember.train.data import prepared_data_paths

    # What `ember train` does with data.prepare: use the finished output as it is ...
    config = load_config(cfg, ["data.prepare.shard_tokens=5000"])
    mtime = (tmp_path / "tokens" / "manifest.json").stat().st_mtime_ns
    train, val = prepared_data_paths(config.data)
    assert (train, val) == (str(tmp_path / "tokens" / "train"), str(tmp_path / "tokens" / "validation"))
    assert (tmp_path / "tokens" / "manifest.json").stat().st_mtime_ns == mtime
    # ... refuse it when the config asks for something else ...
    with pytest.raises(PrepareError, match=r"shard_tokens 5000 -> 100000000.*--overwrite"):
        prepared_data_paths(load_config(cfg).data)
    # ... and prepare it first when it does not exist yet.
    fresh = load_config(cfg, [f"data.prepare.output={tmp_path / 'fresh'}", "data.prepare.validation_fraction=0"])
    train, val = prepared_data_paths(fresh.data)
    assert val is None and len(open_dataset(train)) == 10


def test_train_with_data_prepare_and_the_builtin_validation_corpus(tmp_path, texts):
    """data.prepare gives the training shards; data.validation may still name builtin:stdlib."""
    import torch

    from ember.config import config_from_dict
    from ember.distributed.single import SingleDeviceStrategy
    from ember.train.data import data_paths

    write_txt_files(tmp_path / "corpus", texts[:10])
    config = config_from_dict(
        {
            "model": {"preset": "tiny"},
            "data": {
                "seq_len": 32,
                "cache_dir": str(tmp_path / "cache"),
                "validation": "builtin:stdlib",
                "prepare": {"inputs": [str(tmp_path / "corpus")], "output": str(tmp_path / "tokens")},
            },
            "logging": {"run_dir": str(tmp_path / "runs"), "progress_bar": False},
        }
    )
    train, val = data_paths(config, SingleDeviceStrategy(torch.device("cpu")))
    assert train == str(tmp_path / "tokens" / "train")
    assert Path(val).is_dir() and Path(val).is_relative_to(tmp_path / "cache") and len(open_dataset(val)) > 0


# -- the native JSON Lines fast path ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(
    record=st.dictionaries(st.sampled_from(["text", "t", "id", "meta", ""]), JSON_VALUES, max_size=5),
    ascii_only=st.booleans(),
    junk=st.binary(max_size=12),
)
@settings(max_examples=400, deadline=None)
def test_native_jsonl_reads_what_python_reads(record, ascii_only, junk):
    from ember._native import jsonl_texts

    line = json.dumps(record, ensure_ascii=ascii_only).encode() + b"\n"
    damaged = [junk + line, line.replace(b"}", b"", 1) + junk]
    texts, lengths = jsonl_texts([line, *damaged], "text")
    python = record.get("text")
    if isinstance(python, str) and not any(0xD800 <= ord(c) <= 0xDFFF for c in python):
        assert texts[0] == python and lengths[0] == len(python.encode())  # standard JSON: the fast path takes it
    else:
        assert texts[0] is None  # left to Python's parser and its messages
    for text, raw in zip(texts[1:], damaged):
        if text is not None:  # whatever the fast path takes, Python reads the same
            assert json.loads(raw)["text"] == text


# -- truncated compressed inputs -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_truncated_zst_or_gzip_input_is_refused_with_the_same_message(tmp_path, texts, ember, kind):
    zstandard = pytest.importorskip("zstandard")
    if kind == "txt":
        data = "\n".join(texts[:20]).encode()
    else:
        data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts[:20])
    # Two zstd frames, the file cut in the middle of the second: the first frame alone
    # would decompress cleanly, so only the frame structure tells that bytes are missing.
    half = len(data) // 2
    compressor = zstandard.ZstdCompressor()
    first = compressor.compress(data[:half])
    zst = first + compressor.compress(data[half:])
    gz = gzip.compress(data)
    cut = {"zst": zst[: len(zst) - len(zst) // 4], "gz": gz[: len(gz) // 2]}
    assert len(first) < len(cut["zst"])
    messages = {}
    for suffix, content in cut.items():
        path = tmp_path / f"corpus.{kind}.{suffix}"
        path.write_bytes(content)
        for skip_bad in (False, True):
            with pytest.raises(PrepareError) as ei:
                prepare(path, tmp_path / f"out-{suffix}-{skip_bad}", txt_mode="line", skip_bad=skip_bad)
        messages[suffix] = str(ei.value)
        rc, out, err = ember("prepare", path, "-o", tmp_path / f"cli-{suffix}", "--txt-mode", "line")
        assert rc == 2 and f"ember prepare: error: {path.as_posix()}: " in err and "Traceback" not in err
    compression = {"zst": "zstd", "gz": "gzip"}
    for suffix, message in messages.items():
        size = len(cut[suffix])
        assert message == (
            f"{(tmp_path / f'corpus.{kind}.{suffix}').as_posix()}: cannot read it ({compression[suffix]} file): "
            f"it ends at byte {size} in the middle of compressed data: the file is truncated (copy or download it again)"
        )


def test_zst_inputs_with_several_and_skippable_frames_are_read_whole(tmp_path, texts):
    zstandard = pytest.importorskip("zstandard")
    data = "\n".join(texts[:6]).encode()
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"
    parts = [compressor.compress(data[:100]), skippable, zstandard.ZstdCompressor().compress(b""), compressor.compress(data[100:])]
    (tmp_path / "a.txt.zst").write_bytes(b"".join(parts))
    prepare(tmp_path / "a.txt.zst", tmp_path / "out")
    assert byte_texts(tmp_path / "out" / "train") == [data.decode()]


def test_a_full_disk_is_reported_and_the_output_resumes(tmp_path, texts, monkeypatch, capsys):
    """ENOSPC while writing shards (simulated in the shard writer): a clean error naming the output,
    the finished shards kept, and the same command then finishing it byte for byte."""
    import errno

    from ember import cli
    from ember.data import shards

    write_txt_files(tmp_path / "corpus", texts)
    args = ["prepare", str(tmp_path / "corpus"), "--shard-tokens", "3000", "--workers", "1", "--no-progress"]
    assert cli.main([*args, "--output", str(tmp_path / "straight")]) == 0
    capsys.readouterr()

    original, calls = shards.ShardWriter.add_document, {"n": 0}

    def add_document(self, tokens):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return original(self, tokens)

    with monkeypatch.context() as mp:
        mp.setattr(shards.ShardWriter, "add_document", add_document)
        assert cli.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}: [Errno 28] No space left on device" in err
    assert "the shards finished so far are kept" in err and "run the same command again to resume" in err
    assert (tmp_path / "out" / "progress.json").is_file()
    assert cli.main([*args, "--output", str(tmp_path / "out")]) == 0
    assert tree(tmp_path / "out") == tree(tmp_path / "straight")
