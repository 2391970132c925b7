//! The files the operator gives the gateway: a policy file, the `[tls] upstream_ca` files it
//! names, serve's config. Each is read only if it is a regular file of a sane size, opened
//! without waiting: a FIFO with no writer would block the supervisor, which reads the policy
//! file and its upstream CAs again on SIGHUP, and its SIGHUP and SIGTERM handling with it
//! (serve's other sandboxes' reloads and its stop too); /dev/zero would never end.

use std::{
    fs::File,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Largest policy file, serve config or upstream CA file read: 32 MiB. The largest policies
/// the project measures are 5.6 MiB (tests/bench/policy-scale.sh: 100,000
/// `[[network.allow]]` entries) and 8.1 MiB (tests/bench/reload.sh: 100,000 CIDRs and 10,000
/// host rules); the kernel's maps hold at most 131,072 network entries, about 20 MiB written
/// out one by one with an IPv6 address and a comment each.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// Opens `path` for reading without waiting (O_NONBLOCK: a FIFO with no writer, a device),
/// and keeps it only if it is a regular file of at most `max` bytes; returns it with its
/// length. `what` names it in the error ("the policy file").
pub fn open_regular(path: &Path, max: u64, what: &str) -> io::Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!(
            "it is not a regular file (a FIFO or a device would block the gateway, or never end): {what} must be a regular file"
        )));
    }
    if meta.len() > max {
        return Err(too_large(Some(meta.len()), max, what));
    }
    Ok((file, meta.len()))
}

/// The error of a file over `max` bytes (`len` when known before reading).
pub fn too_large(len: Option<u64>, max: u64, what: &str) -> io::Error {
    io::Error::other(match len {
        Some(len) => format!("it holds {len} bytes, more than the {max} {what} may hold"),
        None => format!("it holds more than the {max} bytes {what} may hold"),
    })
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`] (see [`open_regular`]).
pub fn read(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path, MAX_FILE_BYTES, what)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    // It grew since it was measured.
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(None, MAX_FILE_BYTES, what));
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, what: &str) -> io::Result<String> {
    String::from_utf8(read(path, what)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fs::Dir;

    #[test]
    fn only_a_regular_file_of_a_sane_size_is_read_and_nothing_waits() {
        let dir = Dir::new("trusted-read");
        let file = dir.0.join("p.toml");
        std::fs::write(&file, "version = 1\n").unwrap();
        assert_eq!(
            read_to_string(&file, "the policy file").unwrap(),
            "version = 1\n"
        );
        // A FIFO no one writes: refused at once, not waited on.
        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let started = std::time::Instant::now();
        let e = read_to_string(&fifo, "the policy file").unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(
            e.to_string()
                .ends_with("the policy file must be a regular file"),
            "{e}"
        );
        // A device that never ends, directly or through a link.
        let zero = dir.0.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for path in [Path::new("/dev/zero"), &zero] {
            let e = read(path, "the policy file").unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        assert!(read(&dir.0, "the policy file").is_err());
        // One byte over the cap (sparse: nothing is written), refused before it is read.
        let big = dir.0.join("big.toml");
        File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let e = read(&big, "the policy file").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "it holds {} bytes, more than the {MAX_FILE_BYTES} the policy file may hold",
                MAX_FILE_BYTES + 1
            )
        );
        File::create(&big).unwrap().set_len(MAX_FILE_BYTES).unwrap();
        assert_eq!(
            read(&big, "the policy file").unwrap().len() as u64,
            MAX_FILE_BYTES
        );
        std::fs::write(&big, [0xff, 0xfe]).unwrap();
        assert!(read_to_string(&big, "the policy file").is_err());
    }
}
