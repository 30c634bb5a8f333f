//! JSON as the fuzzer writes it and reads it back.
//!
//! [`Node`] is a document as it will be written: objects keep their key
//! order and may repeat a key (a true duplicate in the text, which a
//! `serde_json::Value` cannot hold), numbers and keys keep their exact
//! spelling. [`J`] is a document as read back from bytes with serde_json:
//! again duplicates and order are kept, and each number keeps the kind
//! serde_json parsed it as (`u64`, `i64` or `f64`), which is what the
//! engine's parsers see. The reference parsers work on [`J`].

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON document as it will be written.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Node {
    #[default]
    Null,
    Bool(bool),
    /// A number, spelled as given (any text: mutations may put a
    /// non-number here on purpose).
    Num(String),
    Str(String),
    Arr(Vec<Node>),
    /// Entries in order, keys as written JSON string literals (quotes and
    /// escapes included); a key may repeat.
    Obj(Vec<(String, Node)>),
}

/// `s` as a JSON string literal.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

impl Node {
    pub fn num(v: impl fmt::Display) -> Node {
        Node::Num(v.to_string())
    }

    pub fn str(s: &str) -> Node {
        Node::Str(s.to_string())
    }

    /// An object from plain (unquoted) keys.
    pub fn obj(entries: Vec<(&str, Node)>) -> Node {
        Node::Obj(entries.into_iter().map(|(k, v)| (quote(k), v)).collect())
    }

    /// The value of the first entry named `key` (plain, unquoted).
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        let quoted = quote(key);
        match self {
            Node::Obj(entries) => entries.iter_mut().find(|(k, _)| *k == quoted).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets the first entry named `key`, or appends one.
    pub fn set(&mut self, key: &str, value: Node) {
        if let Some(v) = self.get_mut(key) {
            *v = value;
        } else if let Node::Obj(entries) = self {
            entries.push((quote(key), value));
        }
    }

    /// Removes every entry named `key`.
    pub fn remove(&mut self, key: &str) {
        let quoted = quote(key);
        if let Node::Obj(entries) = self {
            entries.retain(|(k, _)| *k != quoted);
        }
    }

    /// Appends an entry even when the key is already there (a duplicate).
    pub fn push_entry(&mut self, key: &str, value: Node) {
        if let Node::Obj(entries) = self {
            entries.push((quote(key), value));
        }
    }

    /// The written document; `spaced` puts blanks and newlines between tokens.
    pub fn render(&self, spaced: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write(&mut out, spaced);
        out
    }

    fn write(&self, out: &mut Vec<u8>, spaced: bool) {
        match self {
            Node::Null => out.extend_from_slice(b"null"),
            Node::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Node::Num(text) => out.extend_from_slice(text.as_bytes()),
            Node::Str(s) => out.extend_from_slice(quote(s).as_bytes()),
            Node::Arr(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(if spaced { b", " } else { b"," });
                    }
                    item.write(out, spaced);
                }
                out.push(b']');
            }
            Node::Obj(entries) => {
                out.extend_from_slice(if spaced { b"{\n  " } else { b"{" });
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(if spaced { b",\n  " } else { b"," });
                    }
                    out.extend_from_slice(key.as_bytes());
                    out.extend_from_slice(if spaced { b" : " } else { b":" });
                    value.write(out, spaced);
                }
                out.extend_from_slice(if spaced { b"\n}\t" } else { b"}" });
            }
        }
    }
}

/// A JSON document as serde_json reads it, duplicates and number kinds kept.
#[derive(Clone, Debug, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    U(u64),
    I(i64),
    F(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    /// `bytes` as one JSON document (serde_json's syntax, UTF-8 and
    /// nesting-depth rules, nothing but whitespace after it), or `None`.
    pub fn parse(bytes: &[u8]) -> Option<J> {
        serde_json::from_slice(bytes).ok()
    }

    /// The f64 a number denotes, as serde_json hands it to a visitor
    /// (`u64` and `i64` converted with `as f64`).
    pub fn number(&self) -> Option<f64> {
        match *self {
            J::U(u) => Some(u as f64),
            J::I(i) => Some(i as f64),
            J::F(f) => Some(f),
            _ => None,
        }
    }

    /// Every value of an object's entries named `key`, in order.
    pub fn all<'a>(entries: &'a [(String, J)], key: &str) -> Vec<&'a J> {
        entries.iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect()
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<J, E> {
        Ok(J::U(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<J, E> {
        Ok(J::I(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<J, E> {
        Ok(J::F(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<J, E> {
        Ok(J::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<J, E> {
        Ok(J::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<J>()? {
            items.push(item);
        }
        Ok(J::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<J>()?;
            entries.push((key, value));
        }
        Ok(J::Obj(entries))
    }
}
