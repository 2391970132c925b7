//! BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH: a whole policy's map entries in a few
//! bpf(2) calls instead of one per entry (100,000 CIDRs: one call per chunk rather than
//! 100,000). aya 0.14 has no batch API, so these are raw calls on the map's fd.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{Pod, maps::MapData};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per call: bounds the kernel's time in one syscall and the copy it makes.
const CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Inserts `keys[i] -> values[i]` for every i. On an error some entries may be in the map:
/// the caller empties it by key.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        call(BPF_MAP_UPDATE_BATCH, map, k, v.as_ptr() as u64).map_err(|(_, e)| e)?;
    }
    Ok(())
}

/// Deletes every key; how many were deleted before an error (a key not there stops the
/// kernel) is returned with it, so the caller can go on one by one.
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> Result<(), (usize, std::io::Error)> {
    let mut done = 0;
    for k in keys.chunks(CHUNK) {
        match call(BPF_MAP_DELETE_BATCH, map, k, 0) {
            Ok(()) => done += k.len(),
            Err((n, e)) => return Err((done + n, e)),
        }
    }
    Ok(())
}

fn call<K: Pod>(
    cmd: libc::c_long,
    map: &MapData,
    keys: &[K],
    values: u64,
) -> Result<(), (usize, std::io::Error)> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is the batch layout of bpf_attr; `keys` (and `values`, when given) hold
    // `count` entries of the map's key and value types (Pod, as the map was made with) and
    // outlive the call; the kernel writes back only `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        Err((attr.count as usize, std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}
