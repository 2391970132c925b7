//! What one proxy audit record costs the tunnel worker that makes it: building the record,
//! timestamp included, and serializing it to its JSON line (sealing and writing happen on the
//! audit writer thread). `cargo bench -p gateway --bench audit_record`.

use std::{hint::black_box, net::SocketAddr, time::Instant};

use gateway::audit::{Layer, ProxyFields, Record, Verdict};

const N: u32 = 200_000;

fn fields() -> ProxyFields {
    ProxyFields {
        method: Some("GET".into()),
        host: Some("api.github.com".into()),
        port: Some(443),
        path: Some("/repos/acme/widgets/pulls?state=open".into()),
        status: Some(200),
        rule: Some(3),
        credential: Some("github".into()),
        client: None,
    }
}

fn per_op(mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..N {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let client: SocketAddr = "127.0.0.1:41234".parse().unwrap();
    let build = per_op(|| {
        let mut f = fields();
        f.client = Some(client);
        let mut r = Record::new(Layer::Proxy, Verdict::Allow, "agent-1", "allowlisted");
        r.proxy = Some(f);
        black_box(r);
    });
    let line = per_op(|| {
        let mut f = fields();
        f.client = Some(client);
        let mut r = Record::new(Layer::Proxy, Verdict::Allow, "agent-1", "allowlisted");
        r.proxy = Some(f);
        black_box(serde_json::to_vec(&r).unwrap());
    });
    let fields_only = per_op(|| {
        black_box(fields());
    });
    println!("proxy audit record on the worker, median of 5 x {N}");
    println!("the request's fields (baseline):      {fields_only:>8.0} ns");
    println!("record built (timestamp, client):     {build:>8.0} ns");
    println!("record built and serialized (JSON):   {line:>8.0} ns");
}
