//! `gateway audit`: reads the log and its rotated files oldest first, keeps the records that
//! match, and prints them as a table for people or JSON lines for programs (as written, but
//! for the escapes of [`escape`]).

use std::io::{self, Write};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    chain::{self, Hash, Link},
    escape::{self, printable},
    files::LogLine,
};

/// Which records to print; `None` matches everything.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub layer: Option<String>,
    pub verdict: Option<String>,
    pub sandbox: Option<String>,
}

/// The fields the table and `policy suggest` read; everything else stays in the line for
/// `--json`.
#[derive(Debug, Deserialize)]
pub struct View {
    pub ts: String,
    pub layer: String,
    pub verdict: String,
    pub sandbox: Option<String>,
    pub reason: Option<String>,
    pub hook: Option<String>,
    pub pid: Option<u64>,
    pub comm: Option<String>,
    pub proto: Option<String>,
    pub dst: Option<String>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub client: Option<String>,
    pub lost: Option<u64>,
    pub repeats: Option<u64>,
    pub suppressed: Option<u64>,
}

impl Filter {
    fn matches(&self, v: &View) -> Result<bool, String> {
        let field = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        if !field(&self.layer, &v.layer)
            || !field(&self.verdict, &v.verdict)
            || !field(&self.sandbox, v.sandbox.as_deref().unwrap_or(""))
        {
            return Ok(false);
        }
        if self.since.is_none() && self.until.is_none() {
            return Ok(true);
        }
        let ts = OffsetDateTime::parse(&v.ts, &Rfc3339)
            .map_err(|e| format!("ts {:?} is not RFC 3339: {e}", v.ts))?;
        Ok(self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Prints the matching records of `lines` to `out`; truncated records are reported on
/// `warn`. A line that is no record (and not a truncated one) is an error naming FILE:LINE.
/// Returns how many records matched.
pub fn print(
    lines: impl IntoIterator<Item = io::Result<LogLine>>,
    names: &[String],
    filter: &Filter,
    format: Format,
    out: &mut dyn Write,
    warn: &mut dyn Write,
) -> anyhow::Result<usize> {
    let mut rows = Vec::new();
    let matched = for_each(lines, names, filter, warn, |line, view| {
        match format {
            Format::Json => {
                escape::write_json_line(&line.bytes, out)?;
                out.write_all(b"\n")?;
            }
            Format::Table => rows.push(row(view)),
        }
        Ok(())
    })?;
    if format == Format::Table {
        table(&rows, out).context("writing the table")?;
    }
    Ok(matched)
}

/// Calls `each` with every record of `lines` that matches `filter`, in order; truncated
/// records are reported on `warn`. A line that is no record (and not a truncated one) is an
/// error naming FILE:LINE. Returns how many records matched.
pub fn for_each(
    lines: impl IntoIterator<Item = io::Result<LogLine>>,
    names: &[String],
    filter: &Filter,
    warn: &mut dyn Write,
    mut each: impl FnMut(&LogLine, &View) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let loc = |l: &LogLine| {
        format!(
            "{}:{}",
            names.get(l.file).map_or("?", String::as_str),
            l.number
        )
    };
    let mut matched = 0;
    // A line that is not JSON: truncated if the next line is the chain-restarted record that
    // names it, or if it is the log's last line and was cut before its newline.
    let mut pending: Option<(String, Hash, bool)> = None;
    for line in lines {
        let line = line?;
        if let Some((at, hash, _)) = pending.take() {
            match chain::link(&line.bytes) {
                Link::Chained {
                    fragment: Some(f), ..
                } if f == hash => writeln!(warn, "{at}: truncated record, ignored")?,
                _ => bail!("{at}: not a valid audit record (damaged or altered)"),
            }
        }
        let view = match serde_json::from_slice::<View>(&line.bytes) {
            Ok(v) => v,
            Err(e) if e.is_data() => bail!("{}: not an audit record: {e}", loc(&line)),
            Err(_) => {
                pending = Some((loc(&line), chain::hash(&line.bytes), line.terminated));
                continue;
            }
        };
        if !filter
            .matches(&view)
            .map_err(|e| anyhow::anyhow!("{}: {e}", loc(&line)))?
        {
            continue;
        }
        matched += 1;
        each(&line, &view)?;
    }
    match pending {
        Some((at, _, false)) => writeln!(warn, "{at}: truncated record, ignored")?,
        Some((at, _, true)) => bail!("{at}: not a valid audit record (damaged or altered)"),
        None => {}
    }
    Ok(matched)
}

const HEADER: [&str; 7] = [
    "TIME",
    "SANDBOX",
    "LAYER",
    "VERDICT",
    "PROCESS",
    "DESTINATION",
    "REASON",
];

fn row(v: &View) -> [String; 7] {
    let process = match (&v.comm, v.pid, &v.client) {
        (Some(comm), Some(pid), _) => format!("{comm}[{pid}]"),
        (Some(comm), None, _) => comm.clone(),
        (None, Some(pid), _) => format!("[{pid}]"),
        (None, None, Some(client)) => client.clone(),
        (None, None, None) => "-".into(),
    };
    let destination = if let Some(dst) = &v.dst {
        dst.clone()
    } else if let Some(host) = &v.host {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = match v.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        let target = format!("{authority}{}", v.path.as_deref().unwrap_or(""));
        match &v.method {
            Some(m) => format!("{m} {target}"),
            None => target,
        }
    } else if v.layer == "kernel" {
        v.proto.clone().unwrap_or_else(|| "-".into())
    } else {
        "-".into()
    };
    let mut reason = v.reason.clone().unwrap_or_else(|| "-".into());
    if let Some(lost) = v.lost {
        reason.push_str(&format!(" ({lost} lost)"));
    }
    if let Some(repeats) = v.repeats {
        reason.push_str(&format!(" ({repeats} more like it)"));
    }
    if let Some(suppressed) = v.suppressed {
        reason.push_str(&format!(" ({suppressed})"));
    }
    [
        v.ts.clone(),
        v.sandbox.clone().unwrap_or_default(),
        v.layer.clone(),
        v.verdict.clone(),
        process,
        destination,
        reason,
    ]
    .map(|s| printable(&s))
}

fn table(rows: &[[String; 7]], out: &mut dyn Write) -> io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut widths = HEADER.map(str::len);
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = HEADER.map(str::to_owned);
    for r in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{Chain, Tail};

    const KERNEL: &str = r#"{"ts":"2024-05-01T10:00:00Z","layer":"kernel","verdict":"deny","sandbox":"a","reason":"not-allowlisted","hook":"connect4","pid":42,"uid":65534,"comm":"python3","proto":"tcp","dst":"127.0.0.1:9"}"#;
    const PROXY: &str = r#"{"ts":"2024-05-01T11:00:00Z","layer":"proxy","verdict":"allow","sandbox":"b","reason":"allowlisted","method":"GET","host":"api.test","port":443,"path":"/v1/x","status":200,"rule":0,"credential":"api","client":"127.0.0.1:5000"}"#;
    const LOST: &str = r#"{"ts":"2024-05-01T12:00:00Z","layer":"kernel","verdict":"deny","sandbox":"a","reason":"events-lost","lost":7}"#;

    fn lines(text: &str) -> Vec<io::Result<LogLine>> {
        let terminated = text.ends_with('\n');
        let body = text.strip_suffix('\n').unwrap_or(text);
        let all: Vec<&str> = body.split('\n').collect();
        all.iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(LogLine {
                    file: 0,
                    number: i + 1,
                    bytes: l.as_bytes().to_vec(),
                    terminated: terminated || i + 1 < all.len(),
                })
            })
            .collect()
    }

    fn run(text: &str, filter: &Filter, format: Format) -> anyhow::Result<(String, String)> {
        let (mut out, mut warn) = (Vec::new(), Vec::new());
        print(
            lines(text),
            &["log".to_string()],
            filter,
            format,
            &mut out,
            &mut warn,
        )?;
        Ok((
            String::from_utf8(out).unwrap(),
            String::from_utf8(warn).unwrap(),
        ))
    }

    fn log() -> String {
        format!("{KERNEL}\n{PROXY}\n{LOST}\n")
    }

    #[test]
    fn the_table_is_aligned() {
        let (out, warn) = run(&log(), &Filter::default(), Format::Table).unwrap();
        assert!(warn.is_empty());
        let rows: Vec<&str> = out.lines().collect();
        assert_eq!(rows.len(), 4, "{out}");
        let col = |name: &str| rows[0].find(name).unwrap();
        assert!(rows[0].starts_with("TIME"));
        assert_eq!(rows[1].find("python3[42]"), Some(col("PROCESS")));
        assert_eq!(rows[2].find("127.0.0.1:5000"), Some(col("PROCESS")));
        assert_eq!(rows[1].find("127.0.0.1:9"), Some(col("DESTINATION")));
        assert_eq!(
            rows[2].find("GET api.test:443/v1/x"),
            Some(col("DESTINATION"))
        );
        assert_eq!(rows[3].find("events-lost (7 lost)"), Some(col("REASON")));
        assert_eq!(rows[2].find("allow "), Some(col("VERDICT")));
    }

    #[test]
    fn the_table_says_how_many_refusals_a_summary_stands_for() {
        let repeats = KERNEL.replace(
            r#""dst":"127.0.0.1:9"}"#,
            r#""dst":"127.0.0.1:9","repeats":999}"#,
        );
        let suppressed = r#"{"ts":"2024-05-01T12:00:01Z","layer":"kernel","verdict":"deny","sandbox":"a","reason":"refusals-suppressed","suppressed":5}"#;
        let (out, _) = run(
            &format!("{repeats}\n{suppressed}\n"),
            &Filter::default(),
            Format::Table,
        )
        .unwrap();
        let rows: Vec<&str> = out.lines().collect();
        let col = rows[0].find("REASON").unwrap();
        assert_eq!(
            rows[1].find("not-allowlisted (999 more like it)"),
            Some(col),
            "{out}"
        );
        assert_eq!(rows[2].find("refusals-suppressed (5)"), Some(col), "{out}");
    }

    #[test]
    fn filters_select_records_and_json_is_unchanged() {
        let only = |f: Filter| run(&log(), &f, Format::Json).unwrap().0;
        assert_eq!(
            only(Filter {
                layer: Some("proxy".into()),
                ..Filter::default()
            }),
            format!("{PROXY}\n")
        );
        assert_eq!(
            only(Filter {
                verdict: Some("deny".into()),
                sandbox: Some("a".into()),
                ..Filter::default()
            }),
            format!("{KERNEL}\n{LOST}\n")
        );
        let at = |s: &str| OffsetDateTime::parse(s, &Rfc3339).unwrap();
        assert_eq!(
            only(Filter {
                since: Some(at("2024-05-01T10:30:00Z")),
                until: Some(at("2024-05-01T11:00:00Z")),
                ..Filter::default()
            }),
            format!("{PROXY}\n")
        );
        assert_eq!(
            only(Filter {
                sandbox: Some("none".into()),
                ..Filter::default()
            }),
            ""
        );
    }

    #[test]
    fn learn_mode_records_are_shown_and_filtered() {
        let learned = PROXY
            .replace(r#""verdict":"allow""#, r#""verdict":"would-deny""#)
            .replace(r#""reason":"allowlisted""#, r#""reason":"not-allowlisted""#)
            .replace(
                r#""rule":0,"credential":"api""#,
                r#""rule":null,"credential":null"#,
            );
        let text = format!("{}{learned}\n", log());
        let (out, _) = run(
            &text,
            &Filter {
                verdict: Some("would-deny".into()),
                ..Filter::default()
            },
            Format::Json,
        )
        .unwrap();
        assert_eq!(out, format!("{learned}\n"));
        let (table, _) = run(&text, &Filter::default(), Format::Table).unwrap();
        let rows: Vec<&str> = table.lines().collect();
        let col = |name: &str| rows[0].find(name).unwrap();
        assert_eq!(rows[4].find("would-deny"), Some(col("VERDICT")), "{table}");
        assert_eq!(
            rows[4].find("not-allowlisted"),
            Some(col("REASON")),
            "{table}"
        );
    }

    #[test]
    fn a_truncated_last_line_is_reported_not_fatal() {
        let text = format!("{KERNEL}\n{}", &PROXY[..40]);
        let (out, warn) = run(&text, &Filter::default(), Format::Json).unwrap();
        assert_eq!(out, format!("{KERNEL}\n"));
        assert_eq!(warn, "log:2: truncated record, ignored\n");
    }

    #[test]
    fn other_bad_lines_are_errors() {
        let text = format!("{KERNEL}\n{}\n{PROXY}\n", &PROXY[..40]);
        let e = run(&text, &Filter::default(), Format::Json).unwrap_err();
        assert_eq!(
            e.to_string(),
            "log:2: not a valid audit record (damaged or altered)"
        );
        let e = run("{\"ts\":1}\n", &Filter::default(), Format::Json).unwrap_err();
        assert!(
            e.to_string().starts_with("log:1: not an audit record"),
            "{e}"
        );
        // A cut line with its newline added is damage, not a crash's truncation.
        let e = run(
            &format!("{}\n", &PROXY[..40]),
            &Filter::default(),
            Format::Json,
        );
        assert!(e.is_err());
    }

    #[test]
    fn a_cut_line_accounted_for_by_a_restart_is_reported() {
        let mut file = Vec::new();
        let mut chain = Chain::FRESH;
        chain.seal(KERNEL.as_bytes(), &mut file);
        file.extend_from_slice(&PROXY.as_bytes()[..50]);
        let resume = Tail::of(&file, true).resume(true, "2024-05-01T13:00:00Z");
        file.extend_from_slice(&resume.prefix);
        let text = String::from_utf8(file).unwrap();
        let (out, warn) = run(&text, &Filter::default(), Format::Table).unwrap();
        assert_eq!(warn, "log:2: truncated record, ignored\n");
        assert!(out.contains("chain-restarted"), "{out}");
        let (out, _) = run(
            &text,
            &Filter {
                layer: Some("kernel".into()),
                ..Filter::default()
            },
            Format::Table,
        )
        .unwrap();
        assert!(!out.contains("chain-restarted"), "{out}");
    }

    #[test]
    fn control_characters_are_escaped() {
        let evil = KERNEL.replace("python3", "py\\u001b[31mthon");
        let (out, _) = run(&format!("{evil}\n"), &Filter::default(), Format::Table).unwrap();
        assert!(!out.contains('\u{1b}'));
        assert!(out.contains("py\\u{1b}[31mthon[42]"), "{out}");
    }

    #[test]
    fn backslashes_bidi_and_format_characters_are_escaped_in_the_table() {
        for (raw, shown) in [
            ("a\u{202e}b", "a\\u{202e}b"),
            (
                "\u{202a}\u{202b}\u{202c}\u{202d}",
                "\\u{202a}\\u{202b}\\u{202c}\\u{202d}",
            ),
            (
                "\u{2066}x\u{2067}\u{2068}\u{2069}",
                "\\u{2066}x\\u{2067}\\u{2068}\\u{2069}",
            ),
            (
                "zero\u{200b}\u{200c}\u{200d}width",
                "zero\\u{200b}\\u{200c}\\u{200d}width",
            ),
            ("\u{200e}\u{200f}\u{61c}", "\\u{200e}\\u{200f}\\u{61c}"),
            ("\u{feff}bom\u{ad}", "\\u{feff}bom\\u{ad}"),
            ("\u{2028}\u{2029}", "\\u{2028}\\u{2029}"),
            ("tag\u{e0041}", "tag\\u{e0041}"),
            ("back\\u{1b}slash", "back\\\\u{1b}slash"),
            ("\u{1b}[31m\u{7f}", "\\u{1b}[31m\\u{7f}"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("plain é 中 ü", "plain é 中 ü"),
        ] {
            assert_eq!(printable(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn json_output_escapes_c1_and_format_characters_keeping_the_value() {
        let comm = "\u{9b}31m\u{85}\u{202e}\u{200b}\u{feff}\u{2066}\u{2028}é中\u{e0001}";
        let evil = KERNEL.replace("python3", comm);
        let (out, _) = run(&format!("{evil}\n"), &Filter::default(), Format::Json).unwrap();
        assert_eq!(
            out,
            format!(
                "{}\n",
                KERNEL.replace(
                    "python3",
                    r"\u009b31m\u0085\u202e\u200b\ufeff\u2066\u2028é中\udb40\udc01"
                )
            )
        );
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["comm"], comm, "the same value");
        // Lines with nothing to escape are printed as they are.
        let (out, _) = run(&log(), &Filter::default(), Format::Json).unwrap();
        assert_eq!(out, log());
    }
}
