//! Byte-pair merges over the UTF-8 bytes of one pre-token, in the order the Hugging
//! Face `BPE` model applies them: repeatedly the pair with the lowest merge rank,
//! the leftmost one among equals, until no pair of neighbours has a merge.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use crate::Error;

/// Merges of short pieces scan for the best pair; longer ones use a heap.
const SCAN_LIMIT: usize = 64;

#[derive(Debug, Clone)]
pub struct Bpe {
    byte_ids: [u32; 256],
    /// (left id, right id) packed as `left << 32 | right` -> (rank, merged id).
    merges: FxHashMap<u64, (u32, u32)>,
    /// Whole pieces that are in the vocabulary, when merges are skipped for them.
    whole: Option<FxHashMap<Box<[u8]>, u32>>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

impl Bpe {
    /// `vocab`: every token as its bytes, with its id; it must hold all 256 single
    /// bytes. `merges`: the merge list in rank order, each as the two tokens' bytes.
    /// `ignore_merges`: a piece that is itself in the vocabulary becomes that one id.
    pub fn new(vocab: &[(Vec<u8>, u32)], merges: &[(Vec<u8>, Vec<u8>)], ignore_merges: bool) -> Result<Self, Error> {
        let ids: FxHashMap<&[u8], u32> = vocab.iter().map(|(t, i)| (t.as_slice(), *i)).collect();
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *ids
                .get(&[b as u8][..])
                .ok_or_else(|| Error::Unsupported(format!("the vocabulary has no token for byte {b:#04x}")))?;
        }
        let mut table = FxHashMap::default();
        table.reserve(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let find = |t: &[u8]| {
                ids.get(t)
                    .copied()
                    .ok_or_else(|| Error::Unsupported(format!("merge {rank}: token {t:?} is not in the vocabulary")))
            };
            let merged: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
            let entry = (rank as u32, find(&merged)?);
            if table.insert(key(find(a)?, find(b)?), entry).is_some() {
                return Err(Error::Unsupported(format!("merge {rank} repeats an earlier pair")));
            }
        }
        let whole = ignore_merges.then(|| vocab.iter().map(|(t, i)| (t.clone().into_boxed_slice(), *i)).collect());
        Ok(Self {
            byte_ids,
            merges: table,
            whole,
        })
    }

    #[inline]
    fn merge(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merges.get(&key(a, b)).copied()
    }

    /// Appends the ids of `piece` to `out`.
    pub fn encode(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(id) = self.whole.as_ref().and_then(|w| w.get(piece)) {
            out.push(*id);
            return;
        }
        match piece.len() {
            0 => {}
            1 => out.push(self.byte_ids[piece[0] as usize]),
            n if n <= SCAN_LIMIT => self.encode_scan(piece, out),
            _ => self.encode_heap(piece, out),
        }
    }

    fn encode_scan(&self, piece: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = piece.iter().map(|b| self.byte_ids[*b as usize]).collect();
        // ranks[i]: the merge of ids[i] and ids[i + 1], if any.
        let mut ranks: Vec<Option<(u32, u32)>> = ids.windows(2).map(|w| self.merge(w[0], w[1])).collect();
        loop {
            let mut best: Option<(usize, u32, u32)> = None;
            for (i, r) in ranks.iter().enumerate() {
                if let Some((rank, new)) = *r {
                    if best.map_or(true, |(_, br, _)| rank < br) {
                        best = Some((i, rank, new));
                    }
                }
            }
            let Some((i, _, new)) = best else { break };
            ids[i] = new;
            ids.remove(i + 1);
            ranks.remove(i);
            if i > 0 {
                ranks[i - 1] = self.merge(ids[i - 1], new);
            }
            if i < ranks.len() {
                ranks[i] = self.merge(new, ids[i + 1]);
            }
        }
        out.extend_from_slice(&ids);
    }

    fn encode_heap(&self, piece: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|b| self.byte_ids[*b as usize]).collect();
        let mut alive = vec![true; n];
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut next: Vec<usize> = (0..n).map(|i| if i + 1 == n { NONE } else { i + 1 }).collect();
        // (rank, left position): the lowest rank first, then the leftmost.
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some((rank, _)) = self.merge(ids[i], ids[i + 1]) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE {
                continue;
            }
            // Stale when either side has changed since the entry was pushed.
            let Some((current, new)) = self.merge(ids[i], ids[j]) else {
                continue;
            };
            if current != rank {
                continue;
            }
            ids[i] = new;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE {
                if let Some((r, _)) = self.merge(ids[prev[i]], new) {
                    heap.push(Reverse((r, prev[i])));
                }
            }
            if next[i] != NONE {
                if let Some((r, _)) = self.merge(new, ids[next[i]]) {
                    heap.push(Reverse((r, i)));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(ids[i]);
            i = next[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes plus the given merges, each new token taking the next id.
    fn toy(merges: &[(&str, &str)], ignore_merges: bool) -> (Bpe, FxHashMap<Vec<u8>, u32>) {
        let mut vocab: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], u32::from(b))).collect();
        let mut ms = vec![];
        for (a, b) in merges {
            let t = format!("{a}{b}").into_bytes();
            if !vocab.iter().any(|(v, _)| *v == t) {
                let id = vocab.len() as u32;
                vocab.push((t, id));
            }
            ms.push((a.as_bytes().to_vec(), b.as_bytes().to_vec()));
        }
        let map = vocab.iter().cloned().collect();
        (Bpe::new(&vocab, &ms, ignore_merges).unwrap(), map)
    }

    fn ids(bpe: &Bpe, s: &str) -> Vec<u32> {
        let mut out = vec![];
        bpe.encode(s.as_bytes(), &mut out);
        out
    }

    #[test]
    fn lowest_rank_first_then_leftmost() {
        let (bpe, v) = toy(&[("b", "c"), ("a", "b"), ("a", "bc")], false);
        // "abc": (b,c) has rank 0 and wins over (a,b); then (a,bc).
        assert_eq!(ids(&bpe, "abc"), [v[&b"abc"[..].to_vec()]]);
        let (bpe, v) = toy(&[("a", "a")], false);
        assert_eq!(ids(&bpe, "aaa"), [v[&b"aa".to_vec()], u32::from(b'a')]);
    }

    #[test]
    fn heap_and_scan_agree_on_long_pieces() {
        let (bpe, _) = toy(
            &[("a", "a"), ("aa", "aa"), ("a", "b"), ("ab", "aa"), ("aaaa", "aaaa"), (" ", "a")],
            false,
        );
        let mut state = 7u64;
        for len in [65, 100, 300, 1000] {
            let text: String = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ['a', 'a', 'b', ' '][(state >> 62) as usize]
                })
                .collect();
            let mut scan = vec![];
            bpe.encode_scan(text.as_bytes(), &mut scan);
            let mut heap = vec![];
            bpe.encode_heap(text.as_bytes(), &mut heap);
            assert_eq!(scan, heap, "length {len}");
        }
    }

    #[test]
    fn ignore_merges_takes_whole_pieces() {
        // "ab" is in the vocabulary only through the (a,b) merge, whose rank is last.
        let (bpe, v) = toy(&[("b", "c"), ("a", "b")], true);
        assert_eq!(ids(&bpe, "ab"), [v[&b"ab".to_vec()]]);
        assert_eq!(ids(&bpe, "abc"), [u32::from(b'a'), v[&b"bc".to_vec()]]);
    }

    #[test]
    fn missing_bytes_are_refused() {
        let vocab = vec![(b"a".to_vec(), 0)];
        assert!(Bpe::new(&vocab, &[], false).is_err());
    }
}
