//! Policy scale: how the tunnel's decision time and policy load time grow from a small policy
//! (10 host rules, 100 CIDRs) to a large one (10,000 host rules, 100,000 CIDRs).
//! `cargo bench -p gateway --bench policy_scale` prints the figures and the large/small ratios.
//! The kernel's side of the CIDR lookup is measured by tests/bench/policy-scale.sh.

use std::{
    fmt::Write as _,
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use gateway::{
    kernel::Compiled,
    policy::{self, Policy},
    tunnel::{authority::Authority, rules::Rules},
};
use hyper::Method;

const ROUNDS: usize = 7;
const DECISIONS: usize = 200_000;

/// A policy with `hosts` rules (every tenth a `*.` wildcard, some with methods and paths) and
/// `cidrs` `[[network.allow]]` entries in 10.0.0.0/8. Nothing here is ever dialled.
fn policy_text(hosts: usize, cidrs: usize) -> String {
    let mut t = String::from("version = 1\nname = \"scale\"\n\n");
    for i in 0..cidrs {
        let _ = write!(
            t,
            "[[network.allow]]\ncidr = \"10.{}.{}.{}/32\"\nports = [5432]\n\n",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    for i in 0..hosts {
        if i % 10 == 9 {
            let _ = write!(t, "[[http.allow]]\nhost = \"*.zone{i}.example.test\"\n\n");
        } else {
            let _ = write!(
                t,
                "[[http.allow]]\nhost = \"api{i}.example.test\"\nmethods = [\"GET\"]\npaths = [\"/v1/**\"]\n\n"
            );
        }
    }
    t
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn time<T>(mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

/// Nanoseconds per decision for one request, median of ROUNDS.
fn decision_ns(rules: &Rules, method: &Method, host: &str, path: &str) -> f64 {
    let target = Authority::parse(host, 443).expect("probe host");
    let d = time(|| {
        let mut hits = 0usize;
        for _ in 0..DECISIONS {
            hits += usize::from(
                rules
                    .decide(black_box(method), black_box(&target), black_box(path))
                    .is_some(),
            );
        }
        hits
    });
    d.as_nanos() as f64 / DECISIONS as f64
}

struct Scale {
    label: &'static str,
    hosts: usize,
    cidrs: usize,
}

struct Figures {
    load: Duration,
    compile: Duration,
    kernel: Duration,
    decisions: Vec<(&'static str, f64)>,
}

fn measure(scale: &Scale) -> Figures {
    let text = policy_text(scale.hosts, scale.cidrs);
    let path = Path::new("scale.toml");
    let load = time(|| policy::check_text(path, &text).expect("the generated policy is valid"));
    let policy: Policy = policy::check_text(path, &text).unwrap().policy;
    let compile = time(|| Rules::new(&policy.http).unwrap());
    let rules = Rules::new(&policy.http).unwrap();
    let kernel = time(|| Compiled::new(&policy).unwrap());
    let last = scale.hosts - 2; // the last exact-host rule
    let last_zone = scale.hosts - 1;
    let probes: Vec<(&'static str, Method, String, &str)> = vec![
        (
            "allow, last exact rule",
            Method::GET,
            format!("api{last}.example.test"),
            "/v1/items/7",
        ),
        (
            "allow, wildcard 3 labels down",
            Method::GET,
            format!("a.b.zone{last_zone}.example.test"),
            "/x",
        ),
        (
            "deny, right host, wrong method",
            Method::POST,
            format!("api{last}.example.test"),
            "/v1/items",
        ),
        (
            "deny, unlisted host",
            Method::GET,
            "unlisted.example.org".into(),
            "/",
        ),
    ];
    let decisions = probes
        .iter()
        .map(|(what, m, host, path)| (*what, decision_ns(&rules, m, host, path)))
        .collect();
    println!(
        "{}: {} host rules, {} CIDRs ({} KiB of TOML)",
        scale.label,
        scale.hosts,
        scale.cidrs,
        text.len() / 1024
    );
    Figures {
        load,
        compile,
        kernel,
        decisions,
    }
}

fn main() {
    // `cargo test` runs benches once with --bench absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let small = measure(&Scale {
        label: "small",
        hosts: 10,
        cidrs: 100,
    });
    let large = measure(&Scale {
        label: "large",
        hosts: 10_000,
        cidrs: 100_000,
    });
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "tunnel decision (ns)", "small", "large", "ratio"
    );
    for ((what, s), (_, l)) in small.decisions.iter().zip(&large.decisions) {
        println!("{what:<34} {s:>12.1} {l:>12.1} {:>8.2}", l / s);
    }
    println!();
    println!("{:<34} {:>12} {:>12}", "policy (ms)", "small", "large");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<34} {:>12.2} {:>12.1}",
        "read + check (parse, validate, lint)",
        ms(small.load),
        ms(large.load)
    );
    println!(
        "{:<34} {:>12.3} {:>12.1}",
        "compile the tunnel's rules",
        ms(small.compile),
        ms(large.compile)
    );
    println!(
        "{:<34} {:>12.3} {:>12.1}",
        "compile the kernel's map entries",
        ms(small.kernel),
        ms(large.kernel)
    );
}
