//! The audit log end to end (work in progress).

mod support;
