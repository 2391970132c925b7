//! A TOML document as a tree in which every key and value keeps where it was written, so that
//! validation can walk it table by table and report every problem, not only serde's first.
//!
//! The `toml` crate gives positions through `toml::Spanned`, but only where the document has
//! them (an implicit table such as `credentials` in `credentials.x.env = ...` has none), and
//! `Spanned` fails outright without one. The deserializers below ask for the same span
//! protocol and fall back to the plain value when there is none; `into_tree` then lends the
//! missing spans from the nearest key.

use std::{fmt, ops::Range};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

// The protocol `toml` uses to hand out spans (serde_spanned 0.6, used by toml 0.8).
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const START: &str = "$__serde_spanned_private_start";
const END: &str = "$__serde_spanned_private_end";
const VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[START, END, VALUE];
const DATETIME: &str = "$__toml_private_datetime";

pub type Span = Range<usize>;

/// A key and where it is written.
#[derive(Debug, Clone)]
pub struct Key {
    pub span: Span,
    pub name: String,
}

/// A value and where it is written (a table: from its header on).
#[derive(Debug, Clone)]
pub struct Value {
    pub span: Span,
    pub node: Node,
}

#[derive(Debug, Clone)]
pub enum Node {
    String(String),
    Integer(i64),
    Float,
    Boolean(bool),
    Datetime,
    Array(Vec<Value>),
    Table(Vec<(Key, Value)>),
}

impl Value {
    /// What the value is, for "must be X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self.node {
            Node::String(_) => "a string",
            Node::Integer(_) => "an integer",
            Node::Float => "a float",
            Node::Boolean(_) => "a boolean",
            Node::Datetime => "a date-time",
            Node::Array(_) => "an array",
            Node::Table(_) => "a table",
        }
    }
}

/// Parses TOML text. A syntax error (the only kind that stops the walk) comes back with its
/// span and message.
pub fn parse(text: &str) -> Result<Value, (Span, String)> {
    match toml::from_str::<RawValue>(text) {
        Ok(raw) => Ok(into_tree(raw, 0..0)),
        Err(e) => {
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            let message = if message.is_empty() {
                "TOML syntax error".to_owned()
            } else {
                format!("TOML syntax error: {message}")
            };
            Err((e.span().unwrap_or(0..0), message))
        }
    }
}

struct RawKey {
    span: Option<Span>,
    name: String,
}

struct RawValue {
    span: Option<Span>,
    node: RawNode,
}

enum RawNode {
    String(String),
    Integer(i64),
    Float,
    Boolean(bool),
    Datetime,
    Array(Vec<RawValue>),
    Table(Vec<(RawKey, RawValue)>),
}

/// Fills in missing spans: a value without one takes its key's, a key without one its
/// table's.
fn into_tree(raw: RawValue, fallback: Span) -> Value {
    let span = raw.span.unwrap_or(fallback);
    let node = match raw.node {
        RawNode::String(s) => Node::String(s),
        RawNode::Integer(i) => Node::Integer(i),
        RawNode::Float => Node::Float,
        RawNode::Boolean(b) => Node::Boolean(b),
        RawNode::Datetime => Node::Datetime,
        RawNode::Array(items) => Node::Array(
            items
                .into_iter()
                .map(|v| into_tree(v, span.clone()))
                .collect(),
        ),
        RawNode::Table(entries) => Node::Table(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key_span = k.span.unwrap_or_else(|| span.clone());
                    let value = into_tree(v, key_span.clone());
                    (
                        Key {
                            span: key_span,
                            name: k.name,
                        },
                        value,
                    )
                })
                .collect(),
        ),
    };
    Value { span, node }
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = RawKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawKey, E> {
                Ok(RawKey {
                    span: None,
                    name: v.to_owned(),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawKey, A::Error> {
                let (mut start, mut end, mut name) = (None, None, None);
                while let Some(k) = map.next_key::<RawKey>()? {
                    match k.name.as_str() {
                        START => start = Some(map.next_value::<usize>()?),
                        END => end = Some(map.next_value::<usize>()?),
                        VALUE => name = Some(map.next_value::<String>()?),
                        other => return Err(de::Error::unknown_field(other, SPANNED_FIELDS)),
                    }
                }
                Ok(RawKey {
                    span: start.zip(end).map(|(s, e)| s..e),
                    name: name.ok_or_else(|| de::Error::missing_field(VALUE))?,
                })
            }
        }
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, ValueVisitor { spanned: true })
    }
}

/// The value inside a span wrapper (asking for a span again would loop).
struct Unspanned(RawNode);

impl<'de> Deserialize<'de> for Unspanned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor { spanned: false })
            .map(|v| Unspanned(v.node))
    }
}

struct ValueVisitor {
    /// Whether a map may be the span wrapper rather than a table.
    spanned: bool,
}

fn bare(node: RawNode) -> RawValue {
    RawValue { span: None, node }
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = RawValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
        Ok(bare(RawNode::String(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<RawValue, E> {
        Ok(bare(RawNode::String(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
        Ok(bare(RawNode::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
        Ok(bare(RawNode::Integer(i64::try_from(v).unwrap_or(i64::MAX))))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawValue, E> {
        Ok(bare(RawNode::Float))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawValue, E> {
        Ok(bare(RawNode::Boolean(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element::<RawValue>()? {
            items.push(v);
        }
        Ok(bare(RawNode::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
        let mut entries = Vec::new();
        let (mut start, mut end, mut inner) = (None, None, None);
        while let Some(k) = map.next_key::<RawKey>()? {
            match k.name.as_str() {
                START if self.spanned => start = Some(map.next_value::<usize>()?),
                END if self.spanned => end = Some(map.next_value::<usize>()?),
                VALUE if self.spanned => inner = Some(map.next_value::<Unspanned>()?.0),
                DATETIME if entries.is_empty() => {
                    map.next_value::<de::IgnoredAny>()?;
                    return Ok(bare(RawNode::Datetime));
                }
                _ => {
                    let v = map.next_value::<RawValue>()?;
                    entries.push((k, v));
                }
            }
        }
        match inner {
            Some(node) => Ok(RawValue {
                span: start.zip(end).map(|(s, e)| s..e),
                node,
            }),
            None => Ok(bare(RawNode::Table(entries))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, span: &Span) -> String {
        text[span.clone()].to_owned()
    }

    #[test]
    fn every_key_and_value_has_a_span() {
        let text = "version = 1\ncredentials.gh.env = \"A\"\nwhen = 1979-05-27T07:32:00Z\n\
                    [[http.allow]]\nhost = \"a\"\nmethods = [\"GET\", 3]\n";
        let root = parse(text).unwrap();
        let Node::Table(top) = &root.node else {
            panic!("not a table")
        };
        let names: Vec<_> = top.iter().map(|(k, _)| k.name.as_str()).collect();
        assert_eq!(names, ["version", "credentials", "when", "http"]);
        assert_eq!(at(text, &top[0].1.span), "1");
        // `credentials` is implicit: it borrows its key's span.
        assert_eq!(at(text, &top[1].1.span), "credentials");
        assert!(matches!(top[2].1.node, Node::Datetime));
        let Node::Table(http) = &top[3].1.node else {
            panic!()
        };
        let Node::Array(rules) = &http[0].1.node else {
            panic!()
        };
        assert!(at(text, &rules[0].span).starts_with("[[http.allow]]"));
        let Node::Table(rule) = &rules[0].node else {
            panic!()
        };
        assert_eq!(at(text, &rule[1].0.span), "methods");
        let Node::Array(methods) = &rule[1].1.node else {
            panic!()
        };
        assert_eq!(at(text, &methods[1].span), "3");
    }

    #[test]
    fn syntax_error_has_a_place() {
        let (span, message) = parse("a = 1\na = 2\n").unwrap_err();
        assert_eq!(span.start, 6);
        assert!(message.contains("duplicate key `a`"), "{message}");
    }
}
