//! Splitting text into pre-tokens the way the Hugging Face pre-tokenizers do for
//! GPT-2-style (`ByteLevel` with its regex) and Llama-3-style (`Split` with the
//! cl100k regex, then `ByteLevel` without one) tokenizers.
//!
//! Both regexes end in `\s+(?!\S)|\s+`: a run of whitespace that is followed by a
//! non-space character gives up its last character, which then starts the next
//! pre-token (so `"a   b"` splits as `"a"`, `"  "`, `" b"`). The `regex` crate has no
//! look-around, so the pattern is compiled with the tail `\s+` alone and the
//! give-back is done here. That is exact for the patterns accepted below: in GPT-2's,
//! no earlier branch matches whitespace at all; in the cl100k ones, the only earlier
//! branch that can match a run made only of whitespace is `\s*[\r\n]+`, whose match
//! ends in a line break, while a run the tail matches holds none (checked by tests
//! against the library on every code point).

use regex::Regex;

use crate::Error;

/// The regex of `ByteLevel(use_regex=true)`.
pub const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The regex of Llama 3's `Split` pre-tokenizer (OpenAI's cl100k).
pub const LLAMA3: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The same with single digits (Qwen2 and others).
pub const CL100K_SINGLE_DIGITS: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The patterns this module reproduces exactly.
pub const SUPPORTED: [&str; 3] = [GPT2, LLAMA3, CL100K_SINGLE_DIGITS];

const LOOKAHEAD_TAIL: &str = r"|\s+(?!\S)|\s+";

#[derive(Debug, Clone)]
pub struct PreTokenizer {
    re: Regex,
    /// The pattern has the `\s*[\r\n]+` branch: whitespace ending in a line break is its match.
    line_break_branch: bool,
}

impl PreTokenizer {
    /// `pattern` must be one of [`SUPPORTED`].
    pub fn new(pattern: &str) -> Result<Self, Error> {
        if !SUPPORTED.contains(&pattern) {
            return Err(Error::Unsupported(format!("pre-tokenizer regex {pattern:?}")));
        }
        let head = pattern
            .strip_suffix(LOOKAHEAD_TAIL)
            .expect("every supported pattern ends in the look-ahead tail");
        let re = Regex::new(&format!(r"{head}|\s+")).map_err(|e| Error::Unsupported(e.to_string()))?;
        Ok(Self {
            re,
            line_break_branch: pattern != GPT2,
        })
    }

    /// Calls `f` with each pre-token of `text`, in order; together they cover `text`.
    #[inline]
    pub fn split<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        let bytes = text.as_bytes();
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.re.find_at(text, pos) else {
                f(&text[pos..]);
                return;
            };
            if m.start() > pos {
                f(&text[pos..m.start()]); // a gap no branch matched: the library keeps it as a piece
            }
            let mut end = m.end();
            if end < text.len() && gives_back_last_char(m.as_str(), self.line_break_branch) && !starts_with_whitespace(&text[end..]) {
                end -= last_char_len(m.as_str());
            }
            f(&text[m.start()..end]);
            pos = end;
            debug_assert!(pos <= bytes.len());
        }
    }
}

/// A whitespace run of two or more characters that the `\s+` tail matched (with a
/// line-break branch, one not ending in a line break): `\s+(?!\S)` would have
/// stopped one character short.
#[inline]
fn gives_back_last_char(piece: &str, line_break_branch: bool) -> bool {
    let mut chars = piece.chars();
    let Some(last) = chars.next_back() else {
        return false;
    };
    if (line_break_branch && (last == '\n' || last == '\r')) || !last.is_whitespace() || chars.as_str().is_empty() {
        return false;
    }
    chars.all(char::is_whitespace)
}

#[inline]
fn starts_with_whitespace(s: &str) -> bool {
    s.chars().next().is_some_and(char::is_whitespace)
}

#[inline]
fn last_char_len(s: &str) -> usize {
    s.chars().next_back().map_or(0, char::len_utf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pattern: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(pattern).unwrap();
        let mut out = vec![];
        p.split(text, |s| out.push(s.to_string()));
        out
    }

    #[test]
    fn gpt2_whitespace_gives_back_one_space() {
        assert_eq!(pieces(GPT2, "a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces(GPT2, "a b"), ["a", " b"]);
        assert_eq!(pieces(GPT2, "x  "), ["x", "  "]);
        assert_eq!(pieces(GPT2, "if x:\n    return 1"), ["if", " x", ":", "\n   ", " return", " 1"]);
        assert_eq!(pieces(GPT2, "don't"), ["don", "'t"]);
        assert_eq!(pieces(GPT2, "a\n\nb"), ["a", "\n", "\n", "b"]);
    }

    #[test]
    fn llama3_line_breaks_and_digits() {
        assert_eq!(pieces(LLAMA3, "12345 ab"), ["123", "45", " ab"]);
        assert_eq!(pieces(LLAMA3, "x\n\n  y"), ["x", "\n\n", " ", " y"]);
        assert_eq!(pieces(LLAMA3, "DON'T"), ["DON", "'T"]);
        assert_eq!(pieces(CL100K_SINGLE_DIGITS, "123"), ["1", "2", "3"]);
    }

    #[test]
    fn pieces_cover_the_text() {
        let text = "  héllo wörld\t\t\n 42\u{3000}x ¿qué? \u{1F600}\u{1F600} end  ";
        for p in SUPPORTED {
            assert_eq!(pieces(p, text).concat(), text);
        }
    }

    #[test]
    fn other_patterns_are_refused() {
        assert!(PreTokenizer::new(r"\w+").is_err());
    }
}
