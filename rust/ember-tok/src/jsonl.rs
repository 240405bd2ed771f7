//! The text field of JSON Lines records, fast, for well-formed records only.
//!
//! A record is taken here only when serde_json accepts the line as a JSON object
//! whose field `key` is a string; everything else (malformed lines, non-standard
//! JSON such as `NaN`, a missing or non-string field, lone surrogate escapes) gets
//! `None`, and the caller's own parser decides it, with its own messages. serde_json
//! is stricter than Python's `json` module, never looser, so the texts it returns
//! are the ones Python would have read. As in Python, a repeated key's last value wins.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

struct Field<'k> {
    key: &'k str,
}

impl<'de> Visitor<'de> for Field<'_> {
    /// `Some(value)` when the field was present and every occurrence parsed;
    /// `Some(None)` when its last value is not a string.
    type Value = Option<Option<String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if k == self.key {
                found = Some(map.next_value::<serde_json::Value>().map(|v| match v {
                    serde_json::Value::String(s) => Some(s),
                    _ => None,
                })?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

impl<'de> DeserializeSeed<'de> for Field<'_> {
    type Value = Option<Option<String>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// The string under `key` in the JSON object on `line` (trailing `\r\n` allowed), or
/// `None` for anything else.
pub fn text_field(line: &[u8], key: &str) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let value = Field { key }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    value.flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_only_well_formed_records_with_a_string_field() {
        assert_eq!(
            text_field(b"{\"text\": \"a\\nb \\u00e9\\ud83d\\ude00\", \"n\": [1, {}]}\n", "text").as_deref(),
            Some("a\nb é😀")
        );
        assert_eq!(
            text_field(b"{\"text\": \"x\", \"text\": \"last\"}\r\n", "text").as_deref(),
            Some("last")
        );
        for bad in [
            &b"{\"text\": 1}"[..],
            b"{\"other\": \"x\"}",
            b"[\"text\"]",
            b"{\"text\": \"x\"",
            b"{\"text\": \"x\", \"v\": NaN}",
            b"{\"text\": \"\\ud800\"}",
            b"{\"text\": \"\xff\"}",
            b"{\"text\": \"x\"} trailing",
            b"",
        ] {
            assert_eq!(text_field(bad, "text"), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
