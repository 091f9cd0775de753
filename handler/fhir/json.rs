//! Lossless JSON: a tree whose leaves are the input's own tokens, for the few places that edit a
//! resource (import's reference rewriting and `lastUpdated`, `_elements`).
//!
//! `serde_json::Value` re-spells what it reads: `1.50` becomes `1.5`, `1e2` becomes `100.0`, long
//! decimals lose digits, and even with `arbitrary_precision` `1e2` becomes `1e+2`. FHIR decimals are
//! exact values with significant trailing zeros, so every leaf here (number, string, `true`,
//! `false`, `null`) is written back exactly as it was read; only what an edit replaces changes.
//! serde_json checks the syntax first, so the hand-written walk below only ever sees valid JSON.

use std::borrow::Cow;

use serde::de::IgnoredAny;

/// A JSON value: objects keep their member order, leaves keep their text.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
    Array(Vec<Json<'a>>),
    /// A scalar token as written: `"text"` (quotes and escapes included), a number, or a literal.
    Leaf(Cow<'a, str>),
}

impl<'a> Json<'a> {
    /// Parses one JSON value (surrounding whitespace allowed); errors are serde_json's.
    pub fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        Self::parse_slice(text.as_bytes())
    }

    /// Like [`Json::parse`], from bytes (serde_json checks that they are UTF-8).
    pub fn parse_slice(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<IgnoredAny>(bytes)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| <serde_json::Error as serde::de::Error>::custom("invalid UTF-8"))?;
        let mut walk = Walk { text, at: 0 };
        Ok(walk.value())
    }

    /// A string leaf holding `text`.
    pub fn string(text: &str) -> Json<'static> {
        Json::Leaf(Cow::Owned(
            serde_json::to_string(text).expect("a string serialises"),
        ))
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json<'a>> {
        match self {
            Json::Object(members) => members.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The text of a string leaf, unescaped.
    pub fn as_str(&self) -> Option<Cow<'_, str>> {
        let Json::Leaf(token) = self else {
            return None;
        };
        if !token.starts_with('"') {
            return None;
        }
        let inner = unquoted(token);
        if !inner.contains('\\') {
            return Some(Cow::Borrowed(inner));
        }
        serde_json::from_str::<String>(token).ok().map(Cow::Owned)
    }

    /// Sets the member `key` of an object: in place when present, else inserted at `position`
    /// (clamped to the end). Does nothing to a non-object.
    pub fn set(&mut self, key: &str, value: Json<'a>, position: usize) {
        let Json::Object(members) = self else {
            return;
        };
        match members.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = value,
            None => members.insert(position.min(members.len()), (Cow::Owned(key.into()), value)),
        }
    }

    /// The position of the member `key` in an object.
    pub fn position(&self, key: &str) -> Option<usize> {
        match self {
            Json::Object(members) => members.iter().position(|(k, _)| k == key),
            _ => None,
        }
    }

    /// Compact JSON text.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Json::Leaf(token) => out.extend_from_slice(token.as_bytes()),
            Json::Array(items) => {
                out.push(b'[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    item.write(out);
                }
                out.push(b']');
            }
            Json::Object(members) => {
                out.push(b'{');
                for (index, (key, value)) in members.iter().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, key.as_ref()).expect("a key serialises");
                    out.push(b':');
                    value.write(out);
                }
                out.push(b'}');
            }
        }
    }

    /// The same value as a `serde_json::Value`, for reading (numbers may be re-spelled there).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.to_bytes()).expect("valid JSON")
    }

    /// Calls `visit` with every string under a `reference` key, at any depth; a `Some` it returns
    /// replaces that string.
    pub fn rewrite_references(&mut self, visit: &mut dyn FnMut(&str) -> Option<String>) {
        match self {
            Json::Object(members) => {
                for (key, value) in members.iter_mut() {
                    // A `reference` that is itself an element (a Reference under a member named
                    // `reference`) is walked like any other.
                    let reference = (key == "reference").then(|| value.as_str()).flatten();
                    match reference.and_then(|reference| visit(&reference)) {
                        Some(replaced) => *value = Json::string(&replaced),
                        None => value.rewrite_references(visit),
                    }
                }
            }
            Json::Array(items) => items
                .iter_mut()
                .for_each(|item| item.rewrite_references(visit)),
            Json::Leaf(_) => {}
        }
    }
}

fn unquoted(token: &str) -> &str {
    token
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(token)
}

/// A cursor over text serde_json has already accepted as one JSON value.
struct Walk<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Walk<'a> {
    fn peek(&self) -> u8 {
        self.text.as_bytes().get(self.at).copied().unwrap_or(b'\0')
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }

    fn value(&mut self) -> Json<'a> {
        self.skip_whitespace();
        match self.peek() {
            b'{' => {
                self.at += 1;
                let mut members = Vec::new();
                loop {
                    self.skip_whitespace();
                    if self.peek() == b'}' {
                        self.at += 1;
                        return Json::Object(members);
                    }
                    let key = self.string();
                    let key = match key.contains('\\') {
                        false => Cow::Borrowed(unquoted(key)),
                        true => Cow::Owned(serde_json::from_str(key).expect("a valid string")),
                    };
                    self.skip_whitespace();
                    self.at += 1; // ':'
                    let value = self.value();
                    members.push((key, value));
                    self.skip_whitespace();
                    if self.peek() == b',' {
                        self.at += 1;
                    }
                }
            }
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_whitespace();
                    if self.peek() == b']' {
                        self.at += 1;
                        return Json::Array(items);
                    }
                    items.push(self.value());
                    self.skip_whitespace();
                    if self.peek() == b',' {
                        self.at += 1;
                    }
                }
            }
            b'"' => Json::Leaf(Cow::Borrowed(self.string())),
            _ => {
                let start = self.at;
                while !matches!(
                    self.peek(),
                    b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' | b'\0'
                ) {
                    self.at += 1;
                }
                Json::Leaf(Cow::Borrowed(
                    self.text.get(start..self.at).unwrap_or_default(),
                ))
            }
        }
    }

    /// A string token, quotes included; the cursor is on its opening quote.
    fn string(&mut self) -> &'a str {
        let start = self.at;
        self.at += 1;
        loop {
            match self.peek() {
                b'\\' => self.at += 2,
                b'"' => {
                    self.at += 1;
                    return self.text.get(start..self.at).unwrap_or_default();
                }
                _ => self.at += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_come_back_as_written() {
        let text = r#"{"a":1.50,"b":[1e2,-0.0,1E-7,12345678901234567890.10],"c":"caf\u00e9 \"q\"","d":{},"e":[],"f":null,"g":true}"#;
        let json = Json::parse(text).unwrap();
        assert_eq!(String::from_utf8(json.to_bytes()).unwrap(), text);
        assert_eq!(json.get("c").unwrap().as_str().unwrap(), "café \"q\"");
        let spaced = " { \"a\" : [ 1.0 , { \"b\" : 2 } ] } ";
        assert_eq!(
            Json::parse(spaced).unwrap().to_bytes(),
            br#"{"a":[1.0,{"b":2}]}"#
        );
        assert!(Json::parse("{\"a\":01}").is_err());
        assert!(Json::parse("{\"a\":1} x").is_err());
    }

    #[test]
    fn edits_change_only_what_they_touch() {
        let mut json =
            Json::parse(r#"{"id":"x","s":{"reference":"urn:uuid:1"},"v":1.50}"#).unwrap();
        json.rewrite_references(&mut |r| r.strip_prefix("urn:uuid:").map(|id| format!("P/{id}")));
        let mut nested = Json::parse(
            r#"{"definition":{"resource":[{"reference":{"reference":"urn:uuid:2"}}]},"note":[{"text":"reference"}]}"#,
        )
        .unwrap();
        nested.rewrite_references(&mut |r| r.strip_prefix("urn:uuid:").map(|id| format!("P/{id}")));
        assert_eq!(
            nested.to_bytes(),
            br#"{"definition":{"resource":[{"reference":{"reference":"P/2"}}]},"note":[{"text":"reference"}]}"#
        );
        json.set("meta", Json::parse(r#"{"lastUpdated":"t"}"#).unwrap(), 1);
        assert_eq!(
            json.to_bytes(),
            br#"{"id":"x","meta":{"lastUpdated":"t"},"s":{"reference":"P/1"},"v":1.50}"#
        );
    }
}
