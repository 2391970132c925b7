//! A TOML document as a tree in which every key and value keeps where it was written, so that
//! validation can walk it table by table and report every problem, not only serde's first.
//!
//! `toml`'s own document tree (`DeTable`) already spans every key and value; an implicit
//! table (`credentials` in `[credentials.x]` or `credentials.x.env = ...`) is spanned by its
//! key. Its tables keep the order written (`preserve_order`), which messages follow.

use std::{borrow::Cow, ops::Range};

use toml::{
    Spanned,
    de::{DeArray, DeTable, DeValue},
};

pub type Span = Range<usize>;

/// A key and where it is written. Names and strings borrow from the text unless they had
/// escapes: a large policy holds hundreds of thousands of them.
#[derive(Debug, Clone)]
pub struct Key<'t> {
    pub span: Span,
    pub name: Cow<'t, str>,
}

/// A value and where it is written (a table: from its header on).
#[derive(Debug, Clone)]
pub struct Value<'t> {
    pub span: Span,
    pub node: Node<'t>,
}

#[derive(Debug, Clone)]
pub enum Node<'t> {
    String(Cow<'t, str>),
    Integer(i64),
    Float,
    Boolean(bool),
    Datetime,
    Array(Vec<Value<'t>>),
    Table(Vec<(Key<'t>, Value<'t>)>),
}

impl Value<'_> {
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
pub fn parse(text: &str) -> Result<Value<'_>, (Span, String)> {
    match DeTable::parse(text) {
        Ok(root) => {
            let span = root.span();
            Ok(Value {
                span,
                node: table(root.into_inner())?,
            })
        }
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let mut message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            // toml names neither key of a duplicate; the span is the second one.
            let duplicate = (message == "duplicate key")
                .then(|| text.get(span.clone()))
                .flatten()
                .filter(|k| !k.is_empty());
            if let Some(key) = duplicate {
                message = format!("duplicate key `{key}`");
            }
            Err((span, syntax_error(&message)))
        }
    }
}

fn syntax_error(message: &str) -> String {
    if message.is_empty() {
        "TOML syntax error".to_owned()
    } else {
        format!("TOML syntax error: {message}")
    }
}

fn value(v: Spanned<DeValue<'_>>) -> Result<Value<'_>, (Span, String)> {
    let span = v.span();
    let node = match v.into_inner() {
        DeValue::String(s) => Node::String(s),
        // The parser checks an integer's digits, not its size.
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Node::Integer(n),
            Err(_) => {
                return Err((
                    span,
                    syntax_error(&format!("integer `{i}` does not fit in 64 bits")),
                ));
            }
        },
        DeValue::Float(_) => Node::Float,
        DeValue::Boolean(b) => Node::Boolean(b),
        DeValue::Datetime(_) => Node::Datetime,
        DeValue::Array(items) => array(items)?,
        DeValue::Table(entries) => table(entries)?,
    };
    Ok(Value { span, node })
}

fn array(items: DeArray<'_>) -> Result<Node<'_>, (Span, String)> {
    items
        .into_iter()
        .map(value)
        .collect::<Result<_, _>>()
        .map(Node::Array)
}

fn table(entries: DeTable<'_>) -> Result<Node<'_>, (Span, String)> {
    entries
        .into_iter()
        .map(|(k, v)| {
            let key = Key {
                span: k.span(),
                name: k.into_inner(),
            };
            Ok((key, value(v)?))
        })
        .collect::<Result<_, _>>()
        .map(Node::Table)
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
        let names: Vec<_> = top.iter().map(|(k, _)| k.name.as_ref()).collect();
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

    #[test]
    fn integer_too_large_is_a_syntax_error() {
        let text = "a = 1\nb = 9223372036854775808\n";
        let (span, message) = parse(text).unwrap_err();
        assert_eq!(at(text, &span), "9223372036854775808");
        assert!(message.starts_with("TOML syntax error: "), "{message}");
        assert_eq!(parse("a = -9223372036854775808\n").map(|_| ()), Ok(()));
    }
}
