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
