//! The audit log end to end: real sandboxes (the real `gateway run` as root) write a real
//! log with kernel and proxy records; `gateway audit` reads it back (table, `--json`, each
//! filter, rotated and gzip-compressed files) and `gateway audit verify` checks its hash
//! chain, on the intact log and on copies with a changed byte, a deleted line and two
//! swapped lines.

mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use support::*;

// ---------------------------------------------------------------------------------------
// A sandbox that leaves kernel and proxy records

/// A plain HTTP upstream on 127.0.0.1 answering 200 to every request, for the tunnel's
/// allowed request. Runs until the test process ends.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
            );
        }
    });
    port
}

/// A policy named `name` that lets GET http://api.test/ through to the upstream.
fn audited_policy(name: &str, upstream: u16) -> String {
    policy(
        name,
        &format!(
            "[[http.allow]]\nhost = \"api.test\"\nport = 80\nmethods = [\"GET\"]\nconnect = \"127.0.0.1:{upstream}\"\n"
        ),
    )
}

/// Inside the sandbox: a refused TCP connect (a kernel record), an allowed request and a
/// refused one through the tunnel (two proxy records).
fn script(refused_port: u16) -> String {
    format!(
        r#"
python3 -c 'import socket
try:
    socket.create_connection(("127.0.0.1", {refused_port}), timeout=3)
    print("connect: open")
except OSError as e:
    print("connect: errno", e.errno)'
curl -sS -m 10 -o /dev/null -w 'allowed %{{http_code}}\n' http://api.test/v1/ok
curl -sS -m 10 -o /dev/null -w 'denied %{{http_code}}\n' http://denied.test/x
"#
    )
}

/// One sandbox run writing to `log` (extra `gateway run` options before `--`).
fn sandbox(run: &Run, log: &Path, extra: &[&str], refused_port: u16) -> Output {
    let out = Command::new(gateway_bin())
        .arg("run")
        .arg("--policy")
        .arg(&run.policy)
        .arg("--audit-log")
        .arg(log)
        .args(extra)
        .args(["--user", "nobody", "--", "sh", "-c"])
        .arg(script(refused_port))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("connect: errno 1")
            && stdout.contains("allowed 200")
            && stdout.contains("denied 403"),
        "the sandbox did not do what the records should show\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------
// Running `gateway audit`

struct Audit {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Audit {
    fn describe(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn records(&self) -> Vec<Value> {
        assert_eq!(self.code, 0, "{}", self.describe());
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not JSON: {l}: {e}\n{}", self.describe()))
            })
            .collect()
    }
}

fn audit(args: &[&str]) -> Audit {
    let out = Command::new(gateway_bin())
        .arg("audit")
        .args(args)
        .output()
        .unwrap();
    Audit {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn read_json(log: &Path, filters: &[&str]) -> Vec<Value> {
    let mut args = vec!["--log", p(log), "--json"];
    args.extend_from_slice(filters);
    audit(&args).records()
}

fn verify(log: &Path) -> Audit {
    audit(&["verify", "--log", p(log)])
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn gunzip(path: &Path) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

fn gzip(from: &Path, to: &Path) {
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(to).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(&std::fs::read(from).unwrap()).unwrap();
    enc.finish().unwrap();
    std::fs::remove_file(from).unwrap();
}

fn rotated(log: &Path, n: u32) -> PathBuf {
    PathBuf::from(format!("{}.{n}", log.display()))
}

/// Every record has seq 1, 2, … in order.
fn assert_seq_from_one(records: &[Value]) {
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    let want: Vec<u64> = (1..=records.len() as u64).collect();
    assert_eq!(seqs, want, "{records:#?}");
}

/// Two sandboxes, `audit-a` then `audit-b`, one log.
struct TwoRuns {
    a: Run,
    log: PathBuf,
    refused_port: u16,
}

fn two_runs(tag: &str) -> TwoRuns {
    let upstream = upstream();
    let refused = HostTcp::bind("127.0.0.1:0");
    let a = Run::new(tag, &audited_policy("audit-a", upstream));
    let b = Run::new(tag, &audited_policy("audit-b", upstream));
    let log = a.audit.clone();
    sandbox(&a, &log, &[], refused.port);
    sandbox(&b, &log, &[], refused.port);
    TwoRuns {
        a,
        log,
        refused_port: refused.port,
    }
}

// ---------------------------------------------------------------------------------------
// Reading

#[test]
fn json_output_is_the_log_unchanged_and_each_filter_selects() {
    let runs = two_runs("audit-read");
    let log = &runs.log;
    let raw = std::fs::read_to_string(log).unwrap();
    let all = audit(&["--log", p(log), "--json"]);
    assert_eq!(all.code, 0, "{}", all.describe());
    assert_eq!(all.stdout, raw, "--json prints the records unchanged");
    let records = all.records();
    assert_seq_from_one(&records);
    assert_eq!(records[0]["prev"], "0".repeat(64));

    let kernel = read_json(log, &["--layer", "kernel"]);
    assert!(!kernel.is_empty(), "{raw}");
    assert!(kernel.iter().all(|r| r["layer"] == "kernel"), "{kernel:#?}");
    let dst = format!("127.0.0.1:{}", runs.refused_port);
    for sandbox in ["audit-a", "audit-b"] {
        assert!(
            kernel.iter().any(|r| r["sandbox"] == sandbox
                && r["hook"] == "connect4"
                && r["dst"] == dst.as_str()
                && r["comm"] == "python3"),
            "no kernel record of {sandbox} for {dst}\n{raw}"
        );
    }

    let proxy = read_json(log, &["--layer", "proxy"]);
    assert!(proxy.iter().all(|r| r["layer"] == "proxy"), "{proxy:#?}");
    assert_eq!(kernel.len() + proxy.len(), records.len(), "{raw}");

    let allowed = read_json(log, &["--verdict", "allow"]);
    assert_eq!(allowed.len(), 2, "one allowed request per run\n{raw}");
    for r in &allowed {
        assert_eq!(
            (
                &r["layer"],
                &r["method"],
                &r["host"],
                &r["path"],
                &r["status"]
            ),
            (
                &Value::from("proxy"),
                &Value::from("GET"),
                &Value::from("api.test"),
                &Value::from("/v1/ok"),
                &Value::from(200)
            ),
            "{raw}"
        );
    }
    let denied = read_json(log, &["--verdict", "deny"]);
    assert!(denied.iter().all(|r| r["verdict"] == "deny"));
    assert_eq!(denied.len() + allowed.len(), records.len());
    let denied_proxy = read_json(log, &["--verdict", "deny", "--layer", "proxy"]);
    assert_eq!(denied_proxy.len(), 2, "{raw}");
    assert!(
        denied_proxy
            .iter()
            .all(|r| r["host"] == "denied.test" && r["reason"] == "not-allowlisted"),
        "{denied_proxy:#?}"
    );

    let b = read_json(log, &["--sandbox", "audit-b"]);
    assert!(!b.is_empty());
    assert!(b.iter().all(|r| r["sandbox"] == "audit-b"));
    let a = read_json(log, &["--sandbox", "audit-a"]);
    assert_eq!(a.len() + b.len(), records.len());
    assert!(read_json(log, &["--sandbox", "nobody-here"]).is_empty());

    // --since and --until: on a copy where audit-a's records are two days old. The copy's
    // chain no longer verifies; the reader does not care.
    let aged = runs.a.scratch.dir.join("aged.jsonl");
    let old_ts = "2000-01-01T00:00:00Z";
    let aged_lines: Vec<String> = raw
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if v["sandbox"] == "audit-a" {
                v["ts"] = Value::from(old_ts);
            }
            v.to_string()
        })
        .collect();
    write_lines(&aged, &aged_lines);
    let recent = read_json(&aged, &["--since", "1d"]);
    assert_eq!(recent.len(), b.len(), "{recent:#?}");
    assert!(recent.iter().all(|r| r["sandbox"] == "audit-b"));
    assert_eq!(
        read_json(&aged, &["--since", "1h", "--sandbox", "audit-a"]).len(),
        0
    );
    let until = read_json(&aged, &["--until", "2000-01-02T00:00:00Z"]);
    assert_eq!(until.len(), a.len());
    assert!(until.iter().all(|r| r["sandbox"] == "audit-a"));
    assert_eq!(read_json(log, &["--since", "1h"]).len(), records.len());

    // Usage errors exit 2.
    for bad in [
        &["--log", p(log), "--since", "yesterday"][..],
        &["--log", p(log), "--until", "2000-01-01"],
        &["--log", p(log), "--layer", "kernal"],
        &["--log", p(log), "--verdict", "maybe"],
        &["--json"],
    ] {
        let out = audit(bad);
        assert_eq!(out.code, 2, "{bad:?}\n{}", out.describe());
    }
}

#[test]
fn the_table_shows_who_went_where_and_why() {
    let runs = two_runs("audit-table");
    let log = &runs.log;
    let out = audit(&["--log", p(log)]);
    assert_eq!(out.code, 0, "{}", out.describe());
    let rows: Vec<&str> = out.stdout.lines().collect();
    let header = rows[0];
    for (i, col) in [
        "TIME",
        "SANDBOX",
        "LAYER",
        "VERDICT",
        "PROCESS",
        "DESTINATION",
        "REASON",
    ]
    .iter()
    .enumerate()
    {
        let at = header
            .find(col)
            .unwrap_or_else(|| panic!("no {col}\n{header}"));
        if i == 0 {
            assert_eq!(at, 0);
        }
    }
    let records = read_json(log, &[]);
    assert_eq!(rows.len(), records.len() + 1, "{}", out.describe());
    let col = |name: &str| header.find(name).unwrap();
    let kernel = rows
        .iter()
        .find(|r| r.contains(" kernel "))
        .unwrap_or_else(|| panic!("{}", out.describe()));
    let pid = records
        .iter()
        .find(|r| r["layer"] == "kernel")
        .and_then(|r| r["pid"].as_u64())
        .unwrap();
    assert_eq!(
        kernel.find(&format!("python3[{pid}]")),
        Some(col("PROCESS")),
        "{kernel}"
    );
    assert_eq!(
        kernel.find(&format!("127.0.0.1:{}", runs.refused_port)),
        Some(col("DESTINATION")),
        "{kernel}"
    );
    assert_eq!(kernel.find("not-allowlisted"), Some(col("REASON")));
    assert_eq!(kernel.find("audit-a"), Some(col("SANDBOX")));
    assert_eq!(kernel.find("deny"), Some(col("VERDICT")));
    let allowed = rows
        .iter()
        .find(|r| r.contains("GET api.test:80/v1/ok"))
        .unwrap_or_else(|| panic!("{}", out.describe()));
    assert_eq!(
        allowed.find("GET api.test:80/v1/ok"),
        Some(col("DESTINATION"))
    );
    assert_eq!(
        allowed.find("127.0.0.1:"),
        Some(col("PROCESS")),
        "the client"
    );
    assert_eq!(allowed.find("allowlisted"), Some(col("REASON")));
    assert_eq!(allowed.find("allow "), Some(col("VERDICT")));
    let ts = records[0]["ts"].as_str().unwrap();
    assert!(rows[1].starts_with(ts), "{}", out.describe());

    let proxy_only = audit(&["--log", p(log), "--layer", "proxy", "--sandbox", "audit-b"]);
    assert_eq!(proxy_only.code, 0);
    let rows: Vec<&str> = proxy_only.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{}", proxy_only.describe());
    assert!(
        rows.iter()
            .all(|r| r.contains(" proxy ") && r.contains("audit-b"))
    );
    assert!(!proxy_only.stdout.contains("python3"));
}

// ---------------------------------------------------------------------------------------
// Rotation

#[test]
fn rotated_and_compressed_files_are_read_in_order_and_keep_the_chain() {
    let upstream = upstream();
    let refused = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("audit-rotate", &audited_policy("audit-rot", upstream));
    let log = run.audit.clone();
    // Records are 250 to 400 bytes: about two per file.
    sandbox(&run, &log, &["--audit-max-bytes", "700"], refused.port);
    sandbox(&run, &log, &["--audit-max-bytes", "700"], refused.port);
    assert!(rotated(&log, 2).exists(), "no rotation happened");
    let mut files: Vec<PathBuf> = (1..=10)
        .rev()
        .map(|n| rotated(&log, n))
        .filter(|f| f.exists())
        .collect();
    files.push(log.clone());
    assert!(!rotated(&log, 11).exists());
    let mut oldest_first = String::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.len() <= 700 || text.lines().count() == 1,
            "{f:?} is {} bytes",
            text.len()
        );
        oldest_first.push_str(&text);
    }
    let records = read_json(&log, &[]);
    assert!(records.len() >= 6, "{oldest_first}");
    assert_seq_from_one(&records);
    // Compress the second newest file, as logrotate would: still read, in its place.
    let second = rotated(&log, 2);
    let gz = PathBuf::from(format!("{}.gz", second.display()));
    gzip(&second, &gz);
    assert!(gunzip(&gz).contains("\"seq\":"));
    let out = audit(&["--log", p(&log), "--json"]);
    assert_eq!(out.code, 0, "{}", out.describe());
    assert_eq!(
        out.stdout, oldest_first,
        "files read oldest first, .gz included"
    );
    let table = audit(&["--log", p(&log), "--layer", "kernel"]);
    assert_eq!(table.code, 0, "{}", table.describe());
    assert!(table.stdout.starts_with("TIME "), "{}", table.describe());
    assert!(table.stdout.lines().skip(1).all(|r| r.contains(" kernel ")));
    let python = format!("127.0.0.1:{}", refused.port);
    assert_eq!(
        table.stdout.lines().filter(|r| r.contains(&python)).count(),
        2,
        "one refused connect per run\n{}",
        table.describe()
    );

    // The chain runs through every file.
    let ok = verify(&log);
    assert_eq!(ok.code, 0, "{}", ok.describe());
    let n = records.len();
    assert!(
        ok.stdout
            .starts_with(&format!("{n} records, chain intact from seq 1 to {n}")),
        "{}",
        ok.describe()
    );

    // A changed byte in a rotated file is found there.
    let newest_rotated = rotated(&log, 1);
    let mut lines = lines_of(&newest_rotated);
    let seq = serde_json::from_str::<Value>(&lines[0]).unwrap()["seq"]
        .as_u64()
        .unwrap();
    lines[0] = lines[0].replacen("audit-rot", "audit-roT", 1);
    write_lines(&newest_rotated, &lines);
    let bad = verify(&log);
    assert_eq!(bad.code, 1, "{}", bad.describe());
    assert_eq!(
        bad.stderr.trim_end(),
        format!(
            "{}:1: record seq {seq} was altered (record seq {} after it no longer matches its hash)",
            newest_rotated.display(),
            seq + 1
        ),
        "{}",
        bad.describe()
    );
}

#[test]
fn a_cut_last_line_is_reported_and_the_next_run_restarts_the_chain() {
    let upstream = upstream();
    let refused = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("audit-cut", &audited_policy("audit-cut", upstream));
    let log = run.audit.clone();
    sandbox(&run, &log, &[], refused.port);
    let before = lines_of(&log);
    // A crash in the middle of the last write.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.truncate(bytes.len() - 30);
    std::fs::write(&log, &bytes).unwrap();
    let n = before.len();
    let out = audit(&["--log", p(&log), "--json"]);
    assert_eq!(out.code, 0, "{}", out.describe());
    assert_eq!(out.stdout.lines().count(), n - 1);
    assert_eq!(
        out.stderr,
        format!("{}:{n}: truncated record, ignored\n", log.display())
    );
    let v = verify(&log);
    assert_eq!(v.code, 0, "{}", v.describe());
    assert!(
        v.stdout.starts_with(&format!(
            "{} records, chain intact from seq 1 to {}",
            n - 1,
            n - 1
        )),
        "{}",
        v.describe()
    );
    assert!(
        v.stderr.contains("truncated record at the end of the log"),
        "{}",
        v.describe()
    );

    // The next run ends the cut line, says so in a chain-restarted record, and goes on.
    sandbox(&run, &log, &[], refused.port);
    let after = lines_of(&log);
    let restart: Value = serde_json::from_str(&after[n]).unwrap();
    assert_eq!(restart["reason"], "chain-restarted", "{after:#?}");
    assert_eq!(restart["seq"], n as u64, "takes the cut record's seq");
    let v = verify(&log);
    assert_eq!(v.code, 0, "{}", v.describe());
    assert!(
        v.stderr.contains(&format!(
            "{}:{n}: truncated record, accounted for by the chain-restarted record seq {n}",
            log.display()
        )),
        "{}",
        v.describe()
    );
    let out = audit(&["--log", p(&log), "--json", "--layer", "kernel"]);
    assert_eq!(out.code, 0, "{}", out.describe());
    let connects = out
        .records()
        .iter()
        .filter(|r| r["hook"] == "connect4" && r["comm"] == "python3")
        .count();
    assert_eq!(
        connects,
        2,
        "one refused connect per run\n{}",
        out.describe()
    );
    assert!(out.stderr.contains("truncated record, ignored"));
    // A damaged line anywhere else is an error naming it.
    let mut damaged = after.clone();
    damaged[1].truncate(40);
    let copy = run.scratch.dir.join("damaged.jsonl");
    write_lines(&copy, &damaged);
    let out = audit(&["--log", p(&copy)]);
    assert_eq!(out.code, 1, "{}", out.describe());
    assert!(
        out.stderr
            .contains(&format!("{}:2: not a valid audit record", copy.display())),
        "{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------
// Verify

#[test]
fn verify_names_the_changed_deleted_and_swapped_records() {
    let runs = two_runs("audit-verify");
    let log = &runs.log;
    let lines = lines_of(log);
    let n = lines.len();
    assert!(n >= 6, "{lines:#?}");
    let ok = verify(log);
    assert_eq!(ok.code, 0, "{}", ok.describe());
    assert!(
        ok.stdout
            .starts_with(&format!("{n} records, chain intact from seq 1 to {n}")),
        "{}",
        ok.describe()
    );
    assert_eq!(ok.stdout.lines().count(), 1, "one line\n{}", ok.describe());

    let copy = runs.a.scratch.dir.join("copy.jsonl");
    let tampered = |lines: &[String]| {
        write_lines(&copy, lines);
        let out = verify(&copy);
        assert_eq!(out.code, 1, "{}", out.describe());
        out.stderr.trim_end().to_owned()
    };
    let c = copy.display();

    // One changed byte inside record 3 (its verdict or reason, still valid JSON).
    let mut changed = lines.clone();
    let at = changed[2].find("\"reason\":\"").unwrap() + 10;
    let mut bytes = changed[2].clone().into_bytes();
    bytes[at] ^= 0x20;
    changed[2] = String::from_utf8(bytes).unwrap();
    assert_eq!(
        tampered(&changed),
        format!(
            "{c}:3: record seq 3 was altered (record seq 4 after it no longer matches its hash)"
        )
    );
    // Every record but the newest is covered: change each in turn. The one before the
    // newest is named with its neighbour: with no record after the newest, nothing tells
    // whether it or the newest one's prev was changed.
    for k in 0..n - 1 {
        let mut changed = lines.clone();
        changed[k] = changed[k].replacen("\"sandbox\":\"audit-", "\"sandbox\":\"audiT-", 1);
        assert_ne!(changed[k], lines[k]);
        let (line, seq) = (k + 1, k + 1);
        let want = if k + 2 < n {
            format!(
                "{c}:{line}: record seq {seq} was altered (record seq {} after it no longer matches its hash)",
                seq + 1
            )
        } else {
            format!(
                "{c}:{}: record seq {} was altered or the one before it was (seq {seq}, {c}:{line})",
                line + 1,
                seq + 1
            )
        };
        assert_eq!(tampered(&changed), want);
    }
    // The newest record is pinned only by the hash the summary prints.
    let mut changed = lines.clone();
    changed[n - 1] = changed[n - 1].replacen("\"sandbox\":\"audit-", "\"sandbox\":\"audiT-", 1);
    write_lines(&copy, &changed);
    let out = verify(&copy);
    assert_eq!(out.code, 0, "{}", out.describe());
    assert_ne!(out.stdout, ok.stdout, "the newest record's hash differs");

    // A deleted line.
    let mut deleted = lines.clone();
    deleted.remove(3);
    assert_eq!(
        tampered(&deleted),
        format!(
            "{c}:4: record seq 4 was removed before record seq 5 (the log goes from seq 3 to seq 5)"
        )
    );

    // Two swapped lines.
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    assert_eq!(
        tampered(&swapped),
        format!("{c}:2: record seq 3 is out of order: seq 2 comes after it, at {c}:3")
    );

    // A line that is no longer JSON.
    let mut broken = lines.clone();
    broken[2] = broken[2].replacen('{', "", 1);
    assert_eq!(
        tampered(&broken),
        format!("{c}:3: not a valid audit record: altered, damaged or inserted")
    );

    // The untouched log still verifies, and so does a copy of it.
    write_lines(&copy, &lines);
    assert_eq!(verify(&copy).code, 0);
    assert_eq!(verify(log).code, 0);
}

// ---------------------------------------------------------------------------------------
// Whose files the log trusts

/// The sandbox's user (`nobody`).
const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory like /tmp (root's, world-writable, sticky) inside `run`'s scratch directory.
fn sticky_dir(run: &Run) -> PathBuf {
    let dir = run.scratch.dir.join("tmp");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o1777);
    dir
}

/// `gateway run --audit-log LOG -- true` under `run`'s policy.
fn run_with_log(run: &Run, log: &Path) -> Output {
    Command::new(gateway_bin())
        .arg("run")
        .arg("--policy")
        .arg(&run.policy)
        .arg("--audit-log")
        .arg(log)
        .args(["--user", "nobody", "--", "true"])
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// `gateway run` refused to start on `log`, saying so with `what` and what to do.
fn assert_refused_log(out: &Output, log: &Path, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}", log.display()))
            && stderr.contains(what)
            && stderr.contains("a directory only root can write"),
        "no clear refusal naming {} ({what})\n{stderr}",
        log.display()
    );
}

#[test]
fn a_symlink_at_the_log_path_is_refused_not_followed() {
    let run = Run::new("audit-symlink", &policy("audit-link", ""));
    let tmp = sticky_dir(&run);
    // Any file root can write: the sandbox's user wants the records appended to it.
    let victim = run.scratch.write("victim", "precious\n");
    let link = tmp.join("gateway-audit.jsonl");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused_log(&run_with_log(&run, &link), &link, "symbolic link");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // A dangling link: root does not create the file it points at.
    let missing = run.scratch.dir.join("created-by-root");
    let dangling = tmp.join("dangling.jsonl");
    std::os::unix::fs::symlink(&missing, &dangling).unwrap();
    std::os::unix::fs::lchown(&dangling, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused_log(&run_with_log(&run, &dangling), &dangling, "symbolic link");
    assert!(!missing.exists());
    // A directory on the way that is the sandbox user's link: it could point anywhere.
    let etc_like = run.scratch.dir.join("etc");
    std::fs::create_dir(&etc_like).unwrap();
    let passwd = etc_like.join("passwd");
    std::fs::write(&passwd, "root:x:0:0\n").unwrap();
    let via = tmp.join("via");
    std::os::unix::fs::symlink(&etc_like, &via).unwrap();
    std::os::unix::fs::lchown(&via, Some(NOBODY), Some(NOBODY)).unwrap();
    assert_refused_log(
        &run_with_log(&run, &via.join("passwd")),
        &via,
        "symbolic link",
    );
    assert_eq!(std::fs::read_to_string(&passwd).unwrap(), "root:x:0:0\n");
}

#[test]
fn a_log_file_the_sandbox_user_could_rewrite_is_refused() {
    let run = Run::new("audit-owner", &policy("audit-owner", ""));
    let tmp = sticky_dir(&run);
    // Made by the sandbox's user before the run, mode 644: it could rewrite the records.
    let planted = tmp.join("gateway-audit.jsonl");
    std::fs::write(&planted, "").unwrap();
    std::os::unix::fs::chown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();
    chmod(&planted, 0o644);
    assert_refused_log(
        &run_with_log(&run, &planted),
        &planted,
        "owned by uid 65534",
    );
    assert_eq!(std::fs::read_to_string(&planted).unwrap(), "");
    // Root's, but anyone may write it.
    let open = tmp.join("open.jsonl");
    std::fs::write(&open, "").unwrap();
    chmod(&open, 0o666);
    assert_refused_log(
        &run_with_log(&run, &open),
        &open,
        "writable by group or others",
    );
    assert_eq!(std::fs::read_to_string(&open).unwrap(), "");
    // Not a file.
    let dir = tmp.join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    assert_refused_log(&run_with_log(&run, &dir), &dir, "not a regular file");
    // A directory anyone may write without the sticky bit: anyone could swap the file.
    let shared = run.scratch.dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o777);
    let in_shared = shared.join("audit.jsonl");
    let out = run_with_log(&run, &in_shared);
    assert_refused_log(
        &out,
        &in_shared,
        "writable by others without the sticky bit",
    );
    assert!(!in_shared.exists());
    // The sandbox user's own directory.
    let theirs = tmp.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let in_theirs = theirs.join("audit.jsonl");
    assert_refused_log(
        &run_with_log(&run, &in_theirs),
        &in_theirs,
        "owned by uid 65534",
    );
    assert!(!in_theirs.exists());
}

/// A log straight in /tmp: others may create entries there (sticky or not), and a file or
/// directory planted under a name the log rotates to would stop the records. Refused before
/// anything is made; a directory only root may write works.
#[test]
fn a_log_in_a_directory_others_may_write_is_refused_even_with_the_sticky_bit() {
    let run = Run::new("audit-shared", &policy("audit-shared", ""));
    let log = PathBuf::from(format!(
        "/tmp/gateway-audit-test-{}.jsonl",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&log);
    let out = run_with_log(&run, &log);
    let made = log.exists();
    let _ = std::fs::remove_file(&log);
    assert_refused_log(&out, &log, "its directory /tmp may be written by others");
    assert!(!made, "the refused log was created");
    let own = run.scratch.dir.join("logs");
    std::fs::create_dir(&own).unwrap();
    chmod(&own, 0o755);
    let log = own.join("audit.jsonl");
    for out in [run_with_log(&run, &log), run_with_log(&run, &log)] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o640));
}

#[test]
fn planted_rotated_files_are_not_read_and_fail_verify() {
    let upstream = upstream();
    let refused = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("audit-planted", &audited_policy("audit-plant", upstream));
    // Only root may write the log's directory; what the files below stand for was left there
    // some other way (an older gateway's, a group member's, a restored backup's).
    let dir = run.scratch.dir.join("logs");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let log = dir.join("audit.jsonl");
    sandbox(&run, &log, &[], refused.port);
    let genuine = std::fs::read_to_string(&log).unwrap();
    let ok = verify(&log);
    assert_eq!(ok.code, 0, "{}", ok.describe());
    // The sandbox's user writes LOG.1 next to it: a record it never made, unchained.
    let forged = r#"{"ts":"2030-01-01T00:00:00Z","layer":"proxy","verdict":"allow","sandbox":"audit-plant","reason":"forged-by-nobody","method":"GET","host":"api.test","port":80,"path":"/","status":200,"rule":0,"credential":null,"client":"127.0.0.1:1"}"#;
    let planted = rotated(&log, 1);
    std::fs::write(&planted, format!("{forged}\n")).unwrap();
    std::os::unix::fs::chown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();
    // Root's file, but group-writable; and a link the sandbox's user made to a root file.
    let writable = rotated(&log, 2);
    std::fs::write(&writable, format!("{forged}\n")).unwrap();
    chmod(&writable, 0o664);
    let target = run.scratch.write("elsewhere.jsonl", &format!("{forged}\n"));
    let link = rotated(&log, 3);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
    // A socket, which fails to open (ENXIO) rather than be read: skipped like the others.
    let socket = rotated(&log, 99);
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let warned = |out: &Audit| {
        for (f, why) in [
            (&planted, "owned by uid 65534"),
            (&writable, "writable by group or others"),
            (&link, "symbolic link"),
            (&socket, "not a regular file"),
        ] {
            assert!(
                out.stderr.contains(&format!("{}: not read: ", f.display()))
                    && out.stderr.contains(why),
                "no warning for {}\n{}",
                f.display(),
                out.describe()
            );
        }
    };
    let json = audit(&["--log", p(&log), "--json"]);
    assert_eq!(json.code, 0, "{}", json.describe());
    assert_eq!(json.stdout, genuine, "only the gateway's own records");
    warned(&json);
    let table = audit(&["--log", p(&log)]);
    assert_eq!(table.code, 0, "{}", table.describe());
    assert!(!table.stdout.contains("forged"), "{}", table.describe());
    warned(&table);
    let v = verify(&log);
    assert_eq!(v.code, 1, "{}", v.describe());
    assert!(!v.stdout.contains("chain intact"), "{}", v.describe());
    warned(&v);
}

#[test]
fn verify_fails_on_records_the_chain_does_not_cover() {
    let runs = two_runs("audit-unchained");
    let mut lines = lines_of(&runs.log);
    // Root's own copy, with an unchained record before the chain (as a log from before the
    // chain existed would have, or as an insertion at the very start would).
    lines.insert(
        0,
        r#"{"ts":"2000-01-01T00:00:00Z","layer":"kernel","verdict":"deny","sandbox":"old","reason":"not-allowlisted"}"#.to_owned(),
    );
    let copy = runs.a.scratch.dir.join("unchained.jsonl");
    write_lines(&copy, &lines);
    let out = verify(&copy);
    assert_eq!(out.code, 1, "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("{}:1: ", copy.display()))
            && out.stderr.contains("carry no seq and prev")
            && out.stderr.contains("not verified"),
        "{}",
        out.describe()
    );
    assert!(!out.stdout.contains("chain intact"), "{}", out.describe());
}

// ---------------------------------------------------------------------------------------
// What reaches the auditor's terminal

#[test]
fn what_a_sandbox_chose_is_escaped_for_the_terminal() {
    let upstream = upstream();
    let refused = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("audit-escape", &audited_policy("audit-esc", upstream));
    // A process name with a right-to-left override, a C1 CSI and a backslash sequence that
    // would pass for an escaped ESC: 13 of comm's 15 bytes.
    let script = r#"
import ctypes, socket
ctypes.CDLL(None).prctl(15, "\u202e\u009b\\u{1b}ev".encode(), 0, 0, 0)
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=3)
except OSError as e:
    print("connect: errno", e.errno)
"#
    .replace("PORT", &refused.port.to_string());
    let out = Command::new(gateway_bin())
        .arg("run")
        .arg("--policy")
        .arg(&run.policy)
        .arg("--audit-log")
        .arg(&run.audit)
        .args(["--user", "nobody", "--", "python3", "-c", &script])
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("connect: errno 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let comm = "\u{202e}\u{9b}\\u{1b}ev";
    let table = audit(&["--log", p(&run.audit), "--layer", "kernel"]);
    assert_eq!(table.code, 0, "{}", table.describe());
    assert!(
        table.stdout.contains("\\u{202e}\\u{9b}\\\\u{1b}ev["),
        "{}",
        table.describe()
    );
    let json = audit(&["--log", p(&run.audit), "--layer", "kernel", "--json"]);
    assert_eq!(json.code, 0, "{}", json.describe());
    assert!(
        json.stdout.contains(r#""comm":"\u202e\u009b\\u{1b}ev""#),
        "{}",
        json.describe()
    );
    for out in [&table, &json] {
        assert!(
            !out.stdout.contains(['\u{202e}', '\u{9b}']),
            "{}",
            out.describe()
        );
    }
    let records = json.records();
    assert!(
        records.iter().any(|r| r["comm"] == comm),
        "the same value\n{}",
        json.describe()
    );
}
