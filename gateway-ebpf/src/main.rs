//! Kernel side of the gateway: every way out of the sandbox cgroup passes one of these
//! programs. Policy is compiled in userspace; programs look up maps and give a verdict.
#![no_std]
#![no_main]

mod event;
mod ident;
mod listener;
mod net;
mod skb;
mod socket;
mod sockopt;
mod unix;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
