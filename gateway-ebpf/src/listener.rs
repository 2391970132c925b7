//! Is the socket that would take a connection to the tunnel's address the gateway's own
//! listener? Once the gateway is gone (even `kill -9`) the tunnel's port is free, and any
//! host process may bind it; the sandbox may still connect to that address and port. The
//! gateway tags its listening socket in `TUNNEL_LISTENER`, a socket-local storage map that
//! only it can write (an update needs the map's descriptor); the tag goes with the socket.
//! A connection is let through only when the listener the kernel would hand it to carries
//! the tag.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release, bpf_sk_storage_get},
    macros::btf_map,
};
use gateway_common::SandboxConfig;

use crate::ident::is_v4_mapped;

/// The gateway's tunnel listener -> 1, written by the gateway (from userspace, by the
/// socket's descriptor) and by nothing else; freed with the socket. Not copied to accepted
/// sockets (no `BPF_F_CLONE`): only the listener is ever looked up.
#[btf_map]
static TUNNEL_LISTENER: SkStorage<u32> = SkStorage::new();

/// Whether the socket listening on the tunnel's address and port in the caller's network
/// namespace is the gateway's. `ctx` is the program's context (a `bpf_sock_addr` or a
/// `__sk_buff`): the helper finds the namespace through it.
///
/// The lookup asks for the listener alone: source port 0 matches no connected socket, so
/// the established table (a TIME_WAIT of an earlier connection from the same client port,
/// which the kernel would pass on to the listener) cannot answer in its place.
#[inline(always)]
pub fn is_the_tunnel(ctx: *mut c_void, cfg: &SandboxConfig) -> bool {
    let addr = &cfg.tunnel_addr;
    let dport = cfg.tunnel_port.to_be();
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: [0; 4],
                daddr: [0; 4],
                sport: 0,
                dport: 0,
            },
        },
    };
    let len = if is_v4_mapped(addr) {
        // An IPv4 tunnel (an AF_INET6 socket connecting to ::ffff:a.b.c.d talks IPv4 too).
        let ip = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: ip,
            daddr: ip,
            sport: 0,
            dport,
        };
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([
                addr[i * 4],
                addr[i * 4 + 1],
                addr[i * 4 + 2],
                addr[i * 4 + 3],
            ]);
            i += 1;
        }
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: words,
            daddr: words,
            sport: 0,
            dport,
        };
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    // SAFETY: `tuple` lives on the stack for the call and `len` is the size of the variant
    // written; the helper takes a reference on the socket it returns (released below).
    let sk =
        unsafe { bpf_sk_lookup_tcp(ctx, &mut tuple, len as u32, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the socket the lookup returned; flags 0 never creates storage.
    let tag = unsafe {
        bpf_sk_storage_get(
            (&raw const TUNNEL_LISTENER).cast_mut().cast(),
            sk.cast(),
            null_mut(),
            0,
        )
    };
    let ours = !tag.is_null();
    // SAFETY: releases the reference the lookup took, once, on the only path that has one.
    unsafe { bpf_sk_release(sk.cast()) };
    ours
}
