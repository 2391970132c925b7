//! `connect-loop serve ADDR`: accept and close forever, printing the bound port.
//! `connect-loop connect ADDR N`: N× connect()+close(), printing nanoseconds per pair.
//! `connect-loop sink ADDR`: accept and read to the end forever, printing the bound port.
//! `connect-loop send ADDR MIB`: write MIB mebibytes on one connection, printing MB/s.
#![forbid(unsafe_code)]

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(parse_addr(args.get(2)), drop),
        Some("sink") => serve(parse_addr(args.get(2)), |mut s| {
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }),
        Some("send") => {
            let mib: u64 = args
                .get(3)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| usage());
            send(parse_addr(args.get(2)), mib);
        }
        Some("connect") => {
            let n: u64 = args
                .get(3)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| usage());
            connect(parse_addr(args.get(2)), n);
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: connect-loop serve ADDR | connect ADDR N | sink ADDR | send ADDR MIB");
    std::process::exit(2);
}

fn parse_addr(arg: Option<&String>) -> SocketAddr {
    arg.and_then(|a| a.parse().ok()).unwrap_or_else(|| usage())
}

/// One connect()+close(). Closing with an RST (linger 0) leaves no TIME_WAIT socket behind,
/// so later connects do not slow down searching for a free port.
fn connect_close(addr: SocketAddr) {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket.set_linger(Some(Duration::ZERO)).expect("linger");
    socket.connect(&addr.into()).expect("connect");
}

fn send(addr: SocketAddr, mib: u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk).expect("write");
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    // Wait for the sink to finish reading, so the figure counts delivered bytes.
    let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
    let secs = start.elapsed().as_secs_f64();
    println!("{:.0}", (mib as f64 * 1_048_576.0) / secs / 1e6);
}

fn serve(addr: SocketAddr, handle: fn(TcpStream)) {
    // A deep backlog and two acceptors: an overflowing accept queue drops SYNs, and each
    // dropped SYN costs the client a one-second retransmit that would swamp the figures.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("reuseaddr");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(4096).expect("listen");
    let listener: TcpListener = socket.into();
    println!("{}", listener.local_addr().expect("local addr").port());
    std::io::stdout().flush().expect("flush");
    let second = listener.try_clone().expect("clone listener");
    std::thread::spawn(move || accept_forever(&second, handle));
    accept_forever(&listener, handle);
}

fn accept_forever(listener: &TcpListener, handle: fn(TcpStream)) {
    for stream in listener.incoming().flatten() {
        handle(stream);
    }
}

fn connect(addr: SocketAddr, n: u64) {
    // Warm up the path (route cache, program JIT, listener) before timing.
    for _ in 0..1000 {
        connect_close(addr);
    }
    let start = Instant::now();
    for _ in 0..n {
        connect_close(addr);
    }
    let ns = start.elapsed().as_nanos() / u128::from(n);
    println!("{ns}");
}
