//! End-to-end tests of the readers, the writer and the loader on real files.

use std::path::{Path, PathBuf};

use ember_data::{probe, Error, Format, Loader, LoaderOptions, Outputs, ProbeOptions, ShardWriter, Source};

fn write_ember(path: &Path, vocab: u64, docs: &[Vec<i64>]) {
    let mut w = ShardWriter::create(path, vocab).unwrap();
    for d in docs {
        w.add_document(d).unwrap();
    }
    w.finish().unwrap();
}

fn write_megatron(prefix: &Path, code: u8, size: usize, docs: &[Vec<i64>]) {
    let mut bin = Vec::new();
    let mut lengths = Vec::new();
    let mut pointers = Vec::new();
    for d in docs {
        pointers.extend_from_slice(&(bin.len() as i64).to_le_bytes());
        lengths.extend_from_slice(&(d.len() as i32).to_le_bytes());
        for &t in d {
            bin.extend_from_slice(&t.to_le_bytes()[..size]);
        }
    }
    let n = docs.len() as u64;
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend_from_slice(&1u64.to_le_bytes());
    idx.push(code);
    idx.extend_from_slice(&n.to_le_bytes());
    idx.extend_from_slice(&(n + 1).to_le_bytes());
    idx.extend_from_slice(&lengths);
    idx.extend_from_slice(&pointers);
    for i in 0..=n {
        idx.extend_from_slice(&(i as i64).to_le_bytes());
    }
    std::fs::write(prefix.with_extension("bin"), bin).unwrap();
    std::fs::write(prefix.with_extension("idx"), idx).unwrap();
}

fn write_llmc(path: &Path, v7: bool, tokens: &[i64]) {
    let mut header = [0i32; 256];
    header[0] = if v7 { 20240801 } else { 20240520 };
    header[1] = if v7 { 7 } else { 1 };
    header[2] = tokens.len() as i32;
    let mut out: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    for &t in tokens {
        if v7 {
            out.extend_from_slice(&(t as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(t as u16).to_le_bytes());
        }
    }
    std::fs::write(path, out).unwrap();
}

fn docs_of(src: &Source) -> Vec<Vec<i64>> {
    (0..src.num_docs().unwrap())
        .map(|i| {
            let (si, start, len) = src.doc_location(i).unwrap();
            let base: u64 = (0..si).map(|s| src.spec(s).num_tokens).sum();
            let mut v = vec![0; len as usize];
            src.read_tokens(base + start, &mut v).unwrap();
            v
        })
        .collect()
}

fn sample_docs() -> Vec<Vec<i64>> {
    vec![vec![1, 2, 3], vec![], vec![4], vec![5, 6, 7, 8, 9, 10, 11], vec![12, 13]]
}

#[test]
fn ember_round_trip_and_dtype_choice() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.tok");
    let big = dir.path().join("big.tok");
    write_ember(&small, 65536, &sample_docs());
    write_ember(&big, 65537, &[vec![65536, 0, 1]]);
    let s = probe(&small, &ProbeOptions::default()).unwrap();
    assert_eq!((s.format, s.dtype.size(), s.num_tokens, s.vocab_size), (Format::Ember, 2, 13, Some(65536)));
    assert_eq!(probe(&big, &ProbeOptions::default()).unwrap().dtype.size(), 4);
    let src = Source::open(&[small], &ProbeOptions::default(), 4).unwrap();
    assert_eq!(docs_of(&src), sample_docs());
    let src = Source::open(&[big], &ProbeOptions::default(), 4).unwrap();
    assert_eq!(docs_of(&src), vec![vec![65536, 0, 1]]);
}

#[test]
fn writer_rejects_out_of_vocabulary_tokens_and_leaves_no_file_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.tok");
    let mut w = ShardWriter::create(&path, 10).unwrap();
    w.add_document(&[1i64, 2]).unwrap();
    let err = w.add_document(&[3i64, 10]).unwrap_err().to_string();
    assert!(err.contains("document 1, token 1"), "{err}");
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no final or temporary file may remain");
}

#[test]
fn megatron_every_dtype_and_every_way_to_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let docs = sample_docs();
    for (code, size) in [(1u8, 1usize), (2, 1), (3, 2), (4, 4), (5, 8), (8, 2)] {
        let prefix = dir.path().join(format!("ds{code}"));
        write_megatron(&prefix, code, size, &docs);
        for name in [prefix.clone(), prefix.with_extension("bin"), prefix.with_extension("idx")] {
            let src = Source::open(&[name.clone()], &ProbeOptions::default(), 2).unwrap();
            assert_eq!(src.spec(0).format, Format::Megatron);
            assert_eq!(docs_of(&src), docs, "dtype code {code} via {}", name.display());
        }
    }
}

#[test]
fn llmc_documents_split_at_the_delimiter() {
    let dir = tempfile::tempdir().unwrap();
    let p1 = dir.path().join("v1.bin");
    write_llmc(&p1, false, &[50256, 1, 2, 50256, 3, 50256, 4, 5, 6]);
    let src = Source::open(&[p1.clone()], &ProbeOptions::default(), 2).unwrap();
    assert_eq!(docs_of(&src), vec![vec![50256, 1, 2], vec![50256, 3], vec![50256, 4, 5, 6]]);
    let p7 = dir.path().join("v7.bin");
    write_llmc(&p7, true, &[7, 128000, 200000, 128000]);
    let src = Source::open(&[p7], &ProbeOptions::default(), 2).unwrap();
    assert_eq!(docs_of(&src), vec![vec![7], vec![128000, 200000], vec![128000]]);
    let src = Source::open(&[p1], &ProbeOptions { llmc_delimiter: Some(3) }, 2).unwrap();
    assert_eq!(src.num_docs().unwrap(), 2);
}

fn expect_err(path: &Path, needle: &str) {
    let err = match Source::open(&[path.to_path_buf()], &ProbeOptions::default(), 2).and_then(|s| s.validate(false, None)) {
        Ok(_) => panic!("{} opened but should not have", path.display()),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()) || matches!(err, Error::SizeMismatch { .. }), "{msg}");
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

#[test]
fn corrupt_ember_shards_are_reported_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.tok");
    write_ember(&good, 100, &sample_docs());
    let bytes = std::fs::read(&good).unwrap();
    let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let mut b = bytes.clone();
        f(&mut b);
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    expect_err(&variant("trunc.tok", &|b| b.truncate(b.len() - 3)), "header implies");
    expect_err(&variant("header.tok", &|b| b.truncate(30)), "64-byte header");
    expect_err(&variant("version.tok", &|b| b[8] = 9), "`version` at byte 8");
    expect_err(&variant("dtype.tok", &|b| b[12] = 7), "`dtype` at byte 12");
    expect_err(&variant("magic.tok", &|b| b[0] = b'X'), "not a recognised token shard");
    expect_err(&variant("empty.tok", &|b| b.clear()), "the file is empty");
    let n = bytes.len();
    // The offsets array is the last 8 * (num_docs + 1) bytes; entry 2 sits 4 entries from the end.
    expect_err(&variant("backwards.tok", &|b| b[n - 32..n - 24].copy_from_slice(&1u64.to_le_bytes())), "document index entry 2");
    expect_err(&variant("past.tok", &|b| b[n - 16..n - 8].copy_from_slice(&999u64.to_le_bytes())), "past the end");
    expect_err(&dir.path().join("missing.tok"), "no such file");
}

#[test]
fn corrupt_megatron_and_llmc_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("m");
    write_megatron(&prefix, 8, 2, &sample_docs());
    let idx = prefix.with_extension("idx");
    let mut b = std::fs::read(&idx).unwrap();
    b[17] = 42;
    std::fs::write(&idx, &b).unwrap();
    expect_err(&idx, "unknown dtype code 42");
    write_megatron(&prefix, 8, 2, &sample_docs());
    let mut b = std::fs::read(&idx).unwrap();
    let ptr1 = 34 + 4 * 5 + 8; // second pointer
    b[ptr1..ptr1 + 8].copy_from_slice(&100i64.to_le_bytes());
    std::fs::write(&idx, &b).unwrap();
    expect_err(&idx, "back to back");
    write_megatron(&prefix, 8, 2, &sample_docs());
    let bin = prefix.with_extension("bin");
    let b = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &b[..b.len() - 2]).unwrap();
    expect_err(&idx, "past the end of");

    let p = dir.path().join("l.bin");
    write_llmc(&p, false, &[1, 2, 3]);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1]).unwrap();
    expect_err(&p, "header implies");
    let mut b = b.clone();
    b[4] = 3;
    std::fs::write(&p, &b).unwrap();
    expect_err(&p, "`version`");
}

#[test]
fn random_bytes_never_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 12345u64;
    for i in 0..200 {
        let len = (ember_data::permute::mix(i) % 3000) as usize;
        let mut b: Vec<u8> = (0..len)
            .map(|_| {
                state = ember_data::permute::mix(state);
                state as u8
            })
            .collect();
        // Some files get a valid magic so that the header checks, not the magic check, reject them.
        match i % 4 {
            1 if len >= 8 => b[..8].copy_from_slice(b"EMBERTOK"),
            2 if len >= 9 => b[..9].copy_from_slice(b"MMIDIDX\x00\x00"),
            3 if len >= 4 => b[..4].copy_from_slice(&20240520i32.to_le_bytes()),
            _ => {}
        }
        let p = dir.path().join(format!("r{i}.dat"));
        std::fs::write(&p, &b).unwrap();
        assert!(Source::open(&[p], &ProbeOptions::default(), 2).and_then(|s| s.validate(false, None)).is_err());
    }
}

#[test]
fn directory_of_shards_reads_in_name_order_and_caps_open_maps() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..20i64 {
        write_ember(&dir.path().join(format!("s{i:03}.tok")), 1000, &[vec![i * 10, i * 10 + 1], vec![i * 10 + 2]]);
    }
    std::fs::write(dir.path().join("manifest.json"), "{}").unwrap();
    let src = Source::open(&[dir.path().to_path_buf()], &ProbeOptions::default(), 3).unwrap();
    assert_eq!(src.num_shards(), 20);
    let mut all = vec![0; 60];
    src.read_tokens(0, &mut all).unwrap();
    let want: Vec<i64> = (0..20).flat_map(|i| [i * 10, i * 10 + 1, i * 10 + 2]).collect();
    assert_eq!(all, want);
    assert!(src.num_open() <= 3);
    let mut breaks = Vec::new();
    src.doc_breaks(1, 6, |b| breaks.push(b)).unwrap();
    // Stream positions 1..7: doc boundaries at 2 (doc 2 of shard 0), 3 (shard 1), 5 (its doc 2), 6 (shard 2).
    assert_eq!(breaks, vec![1, 2, 4, 5]);
}

#[test]
fn loader_batches_are_the_same_for_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tok");
    let docs: Vec<Vec<i64>> = (0..50).map(|d| (0..(d % 7 + 1)).map(|t| (d * 10 + t) % 500).collect()).collect();
    write_ember(&path, 500, &docs);
    let opts = |rank, world, batch| LoaderOptions {
        seq_len: 4,
        batch_size: batch,
        rank,
        world_size: world,
        seed: 5,
        shuffle: true,
        drop_last: true,
        num_threads: 2,
        max_open_shards: 4,
        probe: ProbeOptions::default(),
        vocab_size: None,
    };
    let batches = |rank, world, batch| -> Vec<Vec<i64>> {
        let mut l = Loader::new(vec![(vec![path.clone()], 1.0)], opts(rank, world, batch)).unwrap();
        (0..10)
            .map(|_| {
                let plan = l.next_plan().unwrap();
                let mut input = vec![0i64; batch * 4];
                let mut labels = vec![0i64; batch * 4];
                let out = Outputs { input_ids: input.as_mut_ptr(), labels: labels.as_mut_ptr(), position_ids: None, cu_seqlens: None };
                let t = unsafe { l.submit(plan, out) };
                t.wait().unwrap();
                input
            })
            .collect()
    };
    let whole = batches(0, 1, 8);
    let r0 = batches(0, 2, 4);
    let r1 = batches(1, 2, 4);
    for b in 0..10 {
        assert_eq!(whole[b][..16], r0[b][..]);
        assert_eq!(whole[b][16..], r1[b][..]);
    }
}

#[test]
fn loader_with_a_vocabulary_fails_the_batch_holding_an_id_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("web");
    // Ten documents of 6 tokens; document 6 holds id 900 at its token 2 (stream position 38).
    let mut docs: Vec<Vec<i64>> = (0..10).map(|d| (0..6).map(|t| d * 10 + t).collect()).collect();
    docs[6][2] = 900;
    write_megatron(&prefix, 4, 4, &docs);
    let (seq_len, batch) = (4usize, 2usize);
    let opts = |vocab_size| LoaderOptions {
        seq_len,
        batch_size: batch,
        rank: 0,
        world_size: 1,
        seed: 0,
        shuffle: false,
        drop_last: true,
        num_threads: 2,
        max_open_shards: 4,
        probe: ProbeOptions::default(),
        vocab_size,
    };
    let results = |vocab_size| -> Vec<ember_data::Result<Vec<i64>>> {
        let mut l = Loader::new(vec![(vec![prefix.clone()], 1.0)], opts(vocab_size)).unwrap();
        let mut out = Vec::new();
        while let Some(plan) = l.next_plan() {
            let mut input = vec![0i64; batch * seq_len];
            let mut labels = vec![0i64; batch * seq_len];
            let o = Outputs { input_ids: input.as_mut_ptr(), labels: labels.as_mut_ptr(), position_ids: None, cu_seqlens: None };
            out.push(unsafe { l.submit(plan, o) }.wait().map(|_| input));
        }
        out
    };
    // 60 tokens: 14 samples of 4 (+1) tokens, 7 batches; position 38 is in sample 9, batch 4.
    let unchecked = results(None);
    assert_eq!(unchecked.len(), 7);
    assert!(unchecked.iter().all(|r| r.is_ok()));
    assert!(unchecked[4].as_ref().unwrap().contains(&900));
    let checked = results(Some(900));
    for (b, r) in checked.iter().enumerate() {
        match r {
            Ok(input) => assert!(b != 4 && *input == *unchecked[b].as_ref().unwrap(), "batch {b}"),
            Err(Error::TokenOutOfRange { path, token, position, offset, document, vocab_size, .. }) => {
                assert_eq!(b, 4);
                assert_eq!(*path, prefix.with_extension("bin"));
                assert_eq!((*token, *position, *offset, *document, *vocab_size), (900, 38, 38 * 4, 6, 900));
            }
            Err(e) => panic!("batch {b}: {e}"),
        }
    }
    assert!(results(Some(901)).iter().all(|r| r.is_ok()));
    let err = Loader::new(vec![(vec![prefix.clone()], 1.0)], opts(Some(0))).err().expect("vocab_size 0 is refused");
    assert!(err.to_string().contains("vocab_size must be positive"), "{err}");
}
