//! The characters byte-level BPE vocabularies (GPT-2's convention, used by Llama 3)
//! spell bytes with: printable Latin-1 bytes stand for themselves, the other 68
//! bytes for the characters from U+0100 on, in byte order.

/// Whether `b` is one of the bytes that stand for themselves.
fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The byte that `c` stands for, if it is one of the 256 alphabet characters.
pub fn char_to_byte(c: char) -> Option<u8> {
    let c = u32::from(c);
    if c < 256 {
        let b = c as u8;
        return printable(b).then_some(b);
    }
    // The n-th non-printable byte is spelled U+0100 + n.
    let n = c - 256;
    (0..=255u8).filter(|b| !printable(*b)).nth(n as usize)
}

/// A table from alphabet character (as `u32`, at most U+0143) to its byte.
pub struct Alphabet {
    table: [Option<u8>; 0x144],
}

impl Default for Alphabet {
    fn default() -> Self {
        let mut table = [None; 0x144];
        for (i, slot) in table.iter_mut().enumerate() {
            *slot = char::from_u32(i as u32).and_then(char_to_byte);
        }
        Self { table }
    }
}

impl Alphabet {
    /// The bytes `token` spells, or `None` when a character is outside the alphabet.
    pub fn decode(&self, token: &str) -> Option<Vec<u8>> {
        token
            .chars()
            .map(|c| self.table.get(u32::from(c) as usize).copied().flatten())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_is_a_bijection_onto_bytes() {
        let a = Alphabet::default();
        let mut seen = [false; 256];
        for c in (0..0x144u32).filter_map(char::from_u32) {
            if let Some(b) = a.decode(&c.to_string()) {
                assert!(!seen[b[0] as usize]);
                seen[b[0] as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        // The well-known spellings: space is 'Ġ' (U+0120), newline 'Ċ' (U+010A).
        assert_eq!(a.decode("Ġhello"), Some(b" hello".to_vec()));
        assert_eq!(a.decode("Ċ"), Some(b"\n".to_vec()));
        assert_eq!(a.decode(" x"), None);
        assert_eq!(a.decode("日"), None);
    }
}
