//! The gateway's parts, as a library for the `gateway` binary and the benchmarks.

pub mod audit;
pub mod kernel;
pub mod policy;
pub mod reload;
pub mod run;
pub mod sandbox;
pub mod serve;
pub mod tunnel;
