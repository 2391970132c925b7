//! The gateway's parts, as a library for the `gateway` binary and the benchmarks.

pub mod audit;
pub mod kernel;
mod path_walk;
pub mod policy;
pub mod reload;
pub mod run;
pub mod sandbox;
pub mod serve;
#[cfg(test)]
mod test_fs;
pub mod trusted_file;
pub mod tunnel;
pub mod unix_reach;

/// mimalloc instead of glibc's malloc, for every binary built on this library: the tunnel
/// allocates and frees a few dozen small blocks per request (hyper's heads and buffers, the
/// audit line), and mimalloc does that in about 4,000 fewer instructions per request
/// (`tests/bench/tunnel-count.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
