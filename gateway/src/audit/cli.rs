//! The `gateway audit` command line: read (the default) and `verify`.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{files, query, verify};

/// `gateway audit`: read the log, or `gateway audit verify`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AuditCli {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(clap::Subcommand)]
enum AuditCommand {
    /// Check the hash chain: exit 0 when intact, else 1 naming the first record that was
    /// altered, removed or reordered, records the chain does not cover, or a file of the log
    /// that could not be trusted.
    Verify {
        /// The audit log; its rotated files (FILE.1, FILE.2.gz, ...) are checked too.
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
    },
}

#[derive(clap::Args)]
struct ReadArgs {
    /// The audit log; its rotated files (FILE.1, FILE.2.gz, ...) are read too, oldest first.
    #[arg(long, value_name = "FILE", required = true)]
    log: Option<PathBuf>,
    /// Only records from the last DUR: 30s, 15m, 2h, 7d, 1w, or a sum like 1h30m.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    since: Option<time::Duration>,
    /// Only records up to TIME (RFC 3339, e.g. 2024-05-01T12:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<OffsetDateTime>,
    /// Only records of this layer.
    #[arg(long, value_enum)]
    layer: Option<LayerArg>,
    /// Only records with this verdict.
    #[arg(long, value_enum)]
    verdict: Option<VerdictArg>,
    /// Only records of the sandbox with this name.
    #[arg(long, value_name = "NAME")]
    sandbox: Option<String>,
    /// Print the matching records as JSON lines, as written (C1 controls and format
    /// characters escaped as \uXXXX), instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LayerArg {
    Kernel,
    Proxy,
    /// The gateway's own records (policy reloads, `chain-restarted`).
    Gateway,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VerdictArg {
    Deny,
    Allow,
    /// What learn mode let through that the policy refuses.
    WouldDeny,
    /// The gateway's own notes.
    Note,
}

/// `30s`, `15m`, `2h`, `7d`, `1w`, or a sum of them (`1h30m`).
pub fn parse_duration(s: &str) -> Result<time::Duration, String> {
    let bad = || format!("`{s}` is not a duration: use a number and a unit, like 30s, 15m, 2h, 7d");
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        let n: i64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || s.trim().is_empty() {
        return Err(bad());
    }
    Ok(time::Duration::seconds(total))
}

pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time (like 2024-05-01T12:00:00Z): {e}"))
}

/// A size in bytes: `1048576`, or with a unit: `64K`, `10M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size: use bytes, or a number with K, M or G");
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    match n.checked_mul(mult) {
        Some(0) => Err("the size must be more than 0 bytes".into()),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}

/// Runs `gateway audit ...` and returns the exit code.
pub fn run(cli: AuditCli) -> anyhow::Result<i32> {
    let result = match cli.command {
        Some(AuditCommand::Verify { log }) => verify_log(&log),
        None => read(cli.read),
    };
    match result {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(0)
        }
        other => other,
    }
}

/// The lines of `log`'s files, oldest first (opened together, see [`files::open_trusted`]),
/// and the files' names; those not to be trusted are left out with a warning on stderr.
/// Returns how many were.
fn log_files(log: &Path) -> anyhow::Result<(files::Lines, Vec<String>, usize)> {
    let files::Trusted {
        read: files,
        refused,
    } = files::open_trusted(log).context("reading the audit log")?;
    for (path, problem) in &refused {
        eprintln!(
            "warning: {}: not read: {problem}, so its records could be forged",
            path.display()
        );
    }
    let names = files.iter().map(|(p, _)| p.display().to_string()).collect();
    Ok((files::Lines::new(files), names, refused.len()))
}

/// Hands `each` every record of `log` and its rotated files, oldest first, of the sandbox
/// named `sandbox` (every sandbox's when `None`); truncated records are reported on stderr,
/// any other damage is an error. Returns how many records were handed over.
pub fn scan(
    log: &Path,
    sandbox: Option<&str>,
    mut each: impl FnMut(&query::View) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let (lines, names, _) = log_files(log)?;
    let filter = query::Filter {
        sandbox: sandbox.map(str::to_owned),
        ..query::Filter::default()
    };
    query::for_each(lines, &names, &filter, &mut io::stderr(), |_, view| {
        each(view)
    })
}

fn read(args: ReadArgs) -> anyhow::Result<i32> {
    let log = args.log.context("--log FILE is required")?;
    let (lines, names, _) = log_files(&log)?;
    let filter = query::Filter {
        since: args
            .since
            .and_then(|d| OffsetDateTime::now_utc().checked_sub(d)),
        until: args.until,
        layer: args.layer.map(|l| {
            match l {
                LayerArg::Kernel => "kernel",
                LayerArg::Proxy => "proxy",
                LayerArg::Gateway => "gateway",
            }
            .into()
        }),
        verdict: args.verdict.map(|v| {
            match v {
                VerdictArg::Deny => "deny",
                VerdictArg::Allow => "allow",
                VerdictArg::WouldDeny => "would-deny",
                VerdictArg::Note => "note",
            }
            .into()
        }),
        sandbox: args.sandbox,
    };
    let format = if args.json {
        query::Format::Json
    } else {
        query::Format::Table
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let matched = query::print(lines, &names, &filter, format, &mut out, &mut io::stderr())?;
    out.flush()?;
    if matched == 0 && format == query::Format::Table {
        eprintln!("no matching records in {}", log.display());
    }
    Ok(0)
}

fn verify_log(log: &Path) -> anyhow::Result<i32> {
    let (lines, names, refused) = log_files(log)?;
    let mut failed = None;
    let lines = lines.map_while(|r| r.map_err(|e| failed = Some(e)).ok());
    let outcome = verify::verify(lines, &names);
    if let Some(e) = failed {
        return Err(anyhow::Error::new(e).context("reading the audit log"));
    }
    match outcome {
        Ok(intact) if refused == 0 => {
            for note in &intact.notes {
                eprintln!("note: {note}");
            }
            println!("{}", intact.summary());
            Ok(0)
        }
        Ok(intact) => {
            for note in &intact.notes {
                eprintln!("note: {note}");
            }
            eprintln!(
                "{}: not verified: {refused} of its files could not be trusted and were not read (see the warnings above); {}",
                log.display(),
                match intact.span {
                    Some((first, last, _)) => format!(
                        "the others hold {} records of an intact chain from seq {first} to {last}",
                        intact.records
                    ),
                    None => "no other file holds a record".into(),
                }
            );
            Ok(1)
        }
        Err(verify::Broken(message)) => {
            eprintln!("{message}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(time::Duration::minutes(15)));
        assert_eq!(parse_duration("2h"), Ok(time::Duration::hours(2)));
        assert_eq!(parse_duration("7d"), Ok(time::Duration::days(7)));
        assert_eq!(parse_duration("1h30m"), Ok(time::Duration::minutes(90)));
        for bad in ["", "15", "m", "15x", "-1h", "1.5h", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "0", "K", "1T", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times() {
        assert!(parse_time("2024-05-01T12:00:00Z").is_ok());
        assert!(parse_time("2024-05-01 12:00").is_err());
    }
}
