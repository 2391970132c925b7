//! Port lists of `[[network.allow]]`: numbers and `"first-last"` ranges.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    #[cfg(test)]
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// A port written as a number; port 0 is never valid.
    pub fn number(n: i64) -> Result<Self, String> {
        match u16::try_from(n) {
            Ok(0) => Err("bad port `0`: expected 1-65535 or a range like \"8000-8100\"".to_owned()),
            Ok(port) => Ok(Self {
                first: port,
                last: port,
            }),
            Err(_) => Err(format!("bad port {n}: expected 1-65535")),
        }
    }

    /// Parses `"8000-8100"` or `"443"`; port 0 is never valid.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (a, b) = match text.split_once('-') {
            Some((a, b)) => (a, b),
            None => (text, text),
        };
        let port = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!(
                    "bad port `{text}`: expected 1-65535 or a range like \"8000-8100\""
                )),
                Ok(p) => Ok(p),
            }
        };
        let (first, last) = (port(a)?, port(b)?);
        if first > last {
            return Err(format!("bad port range `{text}`: {first} is above {last}"));
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PortRange;

    #[test]
    fn parses_single_and_range() {
        assert_eq!(PortRange::parse("443"), Ok(PortRange::single(443)));
        assert_eq!(
            PortRange::parse("8000-8100"),
            Ok(PortRange {
                first: 8000,
                last: 8100
            })
        );
    }

    #[test]
    fn refuses_zero_reversed_and_junk() {
        assert!(PortRange::parse("0").is_err());
        assert!(PortRange::parse("9-1").is_err());
        assert!(PortRange::parse("70000").is_err());
        assert!(PortRange::parse("http").is_err());
    }

    #[test]
    fn a_number_is_judged_as_its_text_would_be() {
        assert_eq!(PortRange::number(443), Ok(PortRange::single(443)));
        assert_eq!(PortRange::number(0), PortRange::parse("0"));
        assert_eq!(
            PortRange::number(70000),
            Err("bad port 70000: expected 1-65535".to_owned())
        );
        assert!(PortRange::number(-1).is_err());
    }
}
