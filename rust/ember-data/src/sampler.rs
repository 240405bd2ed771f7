//! The global sample order: which sample of which dataset is global sample `g`.
//!
//! Each dataset is cut into samples of `seq_len + 1` tokens with a stride of
//! `seq_len` (consecutive samples share one token, so every token is a label
//! once). With several datasets, global sample `g` goes to the dataset whose
//! share is furthest behind its weight (ties to the earlier dataset): after `g`
//! samples each dataset has had `round(w·g)` within one, deterministically.
//! Within a dataset, its `c`-th draw is epoch `c / n`, and the sample is the
//! epoch's seeded permutation applied to `c % n`; in sequential mode the
//! datasets are read one after another, in order, once.
//!
//! The order depends on the seed and the datasets only, never on the rank or
//! world size: ranks take consecutive slices of each global batch.

use crate::error::{Error, Result};
use crate::permute::Permutation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRef {
    pub dataset: u32,
    /// Sample index within the dataset: tokens `id * seq_len ..= id * seq_len + seq_len`.
    pub id: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    sizes: Vec<u64>,
    weights: Vec<f64>,
    seed: u64,
    shuffle: bool,
    position: u64,
    counts: Vec<u64>,
    /// The current epoch's permutation of each dataset, rebuilt when the epoch changes.
    perms: Vec<Option<(u64, Permutation)>>,
}

impl Sampler {
    /// `sizes[k]` is dataset k's number of samples; weights need not sum to 1.
    pub fn new(sizes: Vec<u64>, weights: Vec<f64>, seed: u64, shuffle: bool) -> Result<Self> {
        if sizes.len() != weights.len() || sizes.is_empty() {
            return Err(Error::Invalid("one weight per dataset is needed".into()));
        }
        if weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
            return Err(Error::Invalid(format!("dataset weights must be positive numbers, got {weights:?}")));
        }
        let total: f64 = weights.iter().sum();
        let k = sizes.len();
        Ok(Sampler {
            weights: weights.iter().map(|w| w / total).collect(),
            sizes,
            seed,
            shuffle,
            position: 0,
            counts: vec![0; k],
            perms: vec![None; k],
        })
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    /// Total samples in sequential mode (one pass); `None` when shuffling (endless).
    pub fn len(&self) -> Option<u64> {
        (!self.shuffle).then(|| self.sizes.iter().sum())
    }

    /// Moves to global position `pos`, as if `pos` samples had been drawn.
    pub fn seek(&mut self, pos: u64) {
        if self.sizes.len() == 1 || !self.shuffle {
            self.position = pos;
            if self.sizes.len() == 1 {
                self.counts[0] = pos;
            }
            return;
        }
        if pos < self.position {
            self.position = 0;
            self.counts.iter_mut().for_each(|c| *c = 0);
        }
        while self.position < pos {
            let k = self.pick();
            self.counts[k] += 1;
            self.position += 1;
        }
    }

    fn pick(&self) -> usize {
        let target = (self.position + 1) as f64;
        let mut best = 0;
        let mut best_gap = f64::NEG_INFINITY;
        for (k, w) in self.weights.iter().enumerate() {
            let gap = w * target - self.counts[k] as f64;
            if gap > best_gap {
                best_gap = gap;
                best = k;
            }
        }
        best
    }

    /// The next global sample, or `None` once a sequential pass is over.
    pub fn next_sample(&mut self) -> Option<SampleRef> {
        if !self.shuffle {
            let mut rest = self.position;
            for (k, &n) in self.sizes.iter().enumerate() {
                if rest < n {
                    self.position += 1;
                    return Some(SampleRef { dataset: k as u32, id: rest, epoch: 0 });
                }
                rest -= n;
            }
            return None;
        }
        let k = if self.sizes.len() == 1 { 0 } else { self.pick() };
        let c = self.counts[k];
        self.counts[k] += 1;
        self.position += 1;
        let n = self.sizes[k];
        let epoch = c / n;
        if !matches!(&self.perms[k], Some((e, _)) if *e == epoch) {
            self.perms[k] = Some((epoch, Permutation::new(n, self.seed, k as u64, epoch)));
        }
        let perm = &self.perms[k].as_ref().unwrap().1;
        Some(SampleRef { dataset: k as u32, id: perm.apply(c % n), epoch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blending_proportions_are_exact() {
        let mut s = Sampler::new(vec![1000, 1000, 1000], vec![0.5, 0.3, 0.2], 7, true).unwrap();
        let mut counts = [0u64; 3];
        for g in 1..=1000u64 {
            let r = s.next_sample().unwrap();
            counts[r.dataset as usize] += 1;
            for (k, w) in [0.5, 0.3, 0.2].iter().enumerate() {
                assert!((counts[k] as f64 - w * g as f64).abs() <= 1.0, "g={g} counts={counts:?}");
            }
        }
        assert_eq!(counts, [500, 300, 200]);
    }

    #[test]
    fn epochs_cover_every_sample_once() {
        let mut s = Sampler::new(vec![37], vec![1.0], 3, true).unwrap();
        for _epoch in 0..3 {
            let mut ids: Vec<u64> = (0..37).map(|_| s.next_sample().unwrap().id).collect();
            ids.sort();
            assert_eq!(ids, (0..37).collect::<Vec<_>>());
        }
    }

    #[test]
    fn seek_matches_drawing() {
        let mut a = Sampler::new(vec![10, 20], vec![1.0, 3.0], 9, true).unwrap();
        for _ in 0..57 {
            a.next_sample();
        }
        let mut b = Sampler::new(vec![10, 20], vec![1.0, 3.0], 9, true).unwrap();
        b.seek(57);
        for _ in 0..40 {
            assert_eq!(a.next_sample(), b.next_sample());
        }
    }

    #[test]
    fn sequential_reads_everything_once_then_stops() {
        let mut s = Sampler::new(vec![2, 3], vec![1.0, 1.0], 0, false).unwrap();
        let got: Vec<(u32, u64)> = std::iter::from_fn(|| s.next_sample()).map(|r| (r.dataset, r.id)).collect();
        assert_eq!(got, vec![(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]);
    }
}
