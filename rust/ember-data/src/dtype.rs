//! Token element types found in shard files.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    F32,
    F64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The NumPy name, used by the Python side to build zero-copy views.
    pub fn numpy_name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// The smallest unsigned type that holds every id of a vocabulary.
    pub fn for_vocab(vocab_size: u64) -> Option<DType> {
        if vocab_size <= 1 << 16 {
            Some(DType::U16)
        } else if vocab_size <= 1 << 32 {
            Some(DType::U32)
        } else {
            None
        }
    }

    /// Reads element `i` of a little-endian array starting at `bytes` as a token id.
    /// Floating-point types (allowed by Megatron's index format) are truncated.
    #[inline]
    pub fn read(self, bytes: &[u8], i: usize) -> i64 {
        let s = self.size();
        let b = &bytes[i * s..i * s + s];
        match self {
            DType::U8 => b[0] as i64,
            DType::I8 => b[0] as i8 as i64,
            DType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            DType::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::I64 => i64::from_le_bytes(b.try_into().unwrap()),
            DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::F64 => f64::from_le_bytes(b.try_into().unwrap()) as i64,
        }
    }

    /// [`DType::widen_into`] that also checks every id against `0..vocab_size`, and
    /// returns the index of the first one outside. Shards are read from memory: a
    /// second pass over a whole row after its copy would find it gone from L1, so the
    /// common types check each block of 256 ids right after widening it, while the
    /// next lines stream in, and decide once at the end (benchmark (a'') in
    /// `benchmarks/test_loader.py` measures the cost).
    pub fn widen_checked(self, bytes: &[u8], out: &mut [i64], vocab_size: u64) -> Option<usize> {
        const BLOCK: usize = 256;
        let size = self.size();
        let bytes = &bytes[..out.len() * size];
        let all_in = match self {
            DType::U16 if vocab_size <= u16::MAX as u64 => {
                let mut max = 0u16;
                for (o, raw) in out.chunks_mut(BLOCK).zip(bytes.chunks(BLOCK * 2)) {
                    self.widen_into(raw, o);
                    max = max.max(raw.chunks_exact(2).fold(0u16, |m, c| m.max(u16::from_le_bytes([c[0], c[1]]))));
                }
                (max as u64) < vocab_size
            }
            DType::U32 if vocab_size < 1 << 31 => {
                let mut all = -1i32;
                for (o, raw) in out.chunks_mut(BLOCK).zip(bytes.chunks(BLOCK * 4)) {
                    self.widen_into(raw, o);
                    all &= u32_all_below_bits(raw, vocab_size as i32);
                }
                all < 0
            }
            _ => {
                self.widen_into(bytes, out);
                self.all_below(bytes, vocab_size)
            }
        };
        if all_in {
            return None;
        }
        Some(out.iter().position(|&t| t as u64 >= vocab_size).expect("a checked id is out of range"))
    }

    /// Whether every id in `bytes` (whole elements of this type) lies in `0..vocab_size`,
    /// reading them as [`DType::read`] does. The loader runs this over every id it hands
    /// out, so the common types take forms that the compiler vectorises with baseline
    /// x86-64 (SSE2) instructions, which lack 64-bit and unsigned 32-bit comparisons.
    pub fn all_below(self, bytes: &[u8], vocab_size: u64) -> bool {
        match self {
            DType::U8 if vocab_size > u8::MAX as u64 => true,
            DType::U16 if vocab_size > u16::MAX as u64 => true,
            DType::U32 if vocab_size > u32::MAX as u64 => true,
            DType::U16 => {
                let max = bytes.chunks_exact(2).fold(0u16, |m, c| m.max(u16::from_le_bytes([c[0], c[1]])));
                (max as u64) < vocab_size
            }
            DType::U32 if vocab_size < 1 << 31 => u32_all_below_bits(bytes, vocab_size as i32) < 0,
            // Rare in shards: signed and float types (a negative id is huge as u64), and
            // vocabularies that cut through u8 or past 2^31.
            _ => (0..bytes.len() / self.size()).all(|i| (self.read(bytes, i) as u64) < vocab_size),
        }
    }

    /// Widens `out.len()` consecutive elements starting at `bytes` into `out`.
    /// This is the loader's hot loop; the common cases are written so the
    /// compiler vectorises them.
    #[inline]
    pub fn widen_into(self, bytes: &[u8], out: &mut [i64]) {
        let n = out.len();
        let s = self.size();
        let bytes = &bytes[..n * s];
        match self {
            DType::U16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]) as i64;
                }
            }
            DType::U32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64;
                }
            }
            DType::I32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64;
                }
            }
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.read(bytes, i);
                }
            }
        }
    }
}

/// The AND over the u32 ids in `bytes` of `(t - v) & !t`, each read as i32: its sign
/// bit is set iff every id is below `v` (positive), as t is below v iff t >= 0 and
/// t - v < 0. One subtraction and two ANDs per id, where SSE2 has no unsigned 32-bit
/// comparison or maximum.
#[inline]
fn u32_all_below_bits(bytes: &[u8], v: i32) -> i32 {
    bytes.chunks_exact(4).fold(-1i32, |a, c| {
        let t = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        a & t.wrapping_sub(v) & !t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_bytes(dtype: DType, ids: &[i64]) -> Vec<u8> {
        ids.iter()
            .flat_map(|&t| match dtype {
                DType::F32 => (t as f32).to_le_bytes().to_vec(),
                DType::F64 => (t as f64).to_le_bytes().to_vec(),
                _ => t.to_le_bytes()[..dtype.size()].to_vec(),
            })
            .collect()
    }

    #[test]
    fn widen_checked_finds_the_first_id_outside_in_any_block() {
        for dtype in [DType::U16, DType::U32, DType::I16] {
            let ids: Vec<i64> = (0..1000).map(|i| i % 300).collect();
            let mut out = vec![-7; 1000];
            assert_eq!(dtype.widen_checked(&le_bytes(dtype, &ids), &mut out, 300), None);
            assert_eq!(out, ids);
            for (first, second) in [(0, 999), (255, 256), (256, 257), (511, 600), (998, 999)] {
                let mut bad = ids.clone();
                bad[first] = 300;
                bad[second] = 301;
                assert_eq!(dtype.widen_checked(&le_bytes(dtype, &bad), &mut out, 300), Some(first), "{dtype:?}");
                assert_eq!(out[first], 300);
            }
        }
    }

    #[test]
    fn all_below_agrees_with_reading_each_id() {
        let types = [DType::U8, DType::I8, DType::I16, DType::U16, DType::I32, DType::U32, DType::I64, DType::F32, DType::F64];
        let vocabs = [1u64, 7, 255, 256, 32000, 65535, 65536, 65537, 128256, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, u64::MAX];
        for dtype in types {
            let bits = 8 * dtype.size() as u32;
            let top = if bits >= 63 { i64::MAX } else { (1i64 << bits) - 1 };
            let signed = matches!(dtype, DType::I8 | DType::I16 | DType::I32 | DType::I64 | DType::F32 | DType::F64);
            for v in vocabs {
                let mut probes: Vec<i64> = [0, 1, 6, 7, 254, 255, 256, 31999, 32000, 65535, 65536, 128255, 128256, (1 << 31) - 1, 1 << 31, top]
                    .into_iter()
                    .filter(|&t| t <= top)
                    .collect();
                if signed {
                    probes.extend([-1, -100]);
                }
                for &bad in &probes {
                    // The probe among in-range ids, at each place a vector loop could leave it.
                    for at in [0usize, 5, 16, 39] {
                        let mut ids = vec![0i64; 40];
                        ids[at] = bad;
                        let bytes = le_bytes(dtype, &ids);
                        let read = dtype.read(&bytes, at);
                        let want = (0..40).all(|i| (dtype.read(&bytes, i) as u64) < v);
                        assert_eq!(dtype.all_below(&bytes, v), want, "{dtype:?} vocab {v} id {bad} (read {read}) at {at}");
                    }
                }
            }
        }
    }
}
