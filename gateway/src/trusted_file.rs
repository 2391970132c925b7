//! The files the operator gives the gateway: a policy file, the `[tls] upstream_ca` files it
//! names, serve's config. Each is read only if it is a regular file of a sane size, opened
//! without waiting (a FIFO with no writer would block the supervisor, and its SIGHUP and
//! SIGTERM handling with it; /dev/zero would never end).
//!
//! A policy file and its upstream CAs are read again on SIGHUP, and by then the sandbox has
//! run: a file its user could write may hold what the sandboxed command put there, a policy
//! that allows everything, or one that names another sandbox's secret file as its own
//! credential. So a reload is refused when the sandbox's user could have written one of them
//! (judged as unix socket paths and secret files are: `unix_reach`, `secret_file`). At start
//! the file is the operator's as it stands (nothing sandboxed has run yet): the gateway only
//! warns that a reload of it will be refused.

use std::{
    fs::File,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use crate::{
    policy::Policy,
    tunnel::{Exposure, LoadContext, SandboxReader, Whose},
};

/// Largest policy file, serve config or upstream CA file read: 32 MiB. The largest policies
/// the project measures are 5.6 MiB (tests/bench/policy-scale.sh: 100,000
/// `[[network.allow]]` entries) and 8.1 MiB (tests/bench/reload.sh: 100,000 CIDRs and 10,000
/// host rules); the kernel's maps hold at most 131,072 network entries, about 20 MiB written
/// out one by one with an IPv6 address and a comment each.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// How a policy file is named in messages.
pub const POLICY_FILE: &str = "policy file";
/// How an upstream CA file is named in messages.
pub const UPSTREAM_CA: &str = "[tls] upstream_ca";

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

/// A file read again on SIGHUP that the sandbox's user (or, under serve, another sandbox's)
/// could have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {}: {why}, so {by} could have rewritten it: it is not reloaded; {}, then send SIGHUP again",
    .path.display(),
    self.fix()
)]
pub struct Writable {
    /// [`POLICY_FILE`] or [`UPSTREAM_CA`].
    pub what: &'static str,
    pub path: PathBuf,
    pub why: String,
    /// Who could have: "the sandboxed command", or "a command in another sandbox".
    pub by: &'static str,
}

impl Writable {
    /// What the operator does about it.
    fn fix(&self) -> String {
        let f = self.path.display();
        format!(
            "keep it where only root may write: chown root:root {f} && chmod go-w {f} (and setfacl -b {f} if it has an access ACL), in directories only root may write (such as /etc/gateway)"
        )
    }

    /// What the gateway says at start, when the file is taken as it stands.
    pub fn warning(&self) -> String {
        format!(
            "{} {}: {}, so {} could rewrite it: SIGHUP reloads of this file will be refused; {}",
            self.what,
            self.path.display(),
            self.why,
            self.by,
            self.fix()
        )
    }
}

/// Why `reader`, the sandbox's user, could have written `path` (or replaced it, or an entry
/// on the way to it); `None` when only root could. With a known user: the file is its own,
/// or its mode, group or an ACL lets it write; or it may write a directory on the way. With
/// none (a `serve` sandbox without `user`) any user but root may be running in the sandbox:
/// the file must be root's (the gateway's) alone, in directories only root may write. A file
/// that cannot be looked at is not judged here: reading it fails afterwards with the reason.
pub fn writable_by(what: &'static str, path: &Path, reader: &SandboxReader) -> Option<Writable> {
    judge(what, path, reader, Whose::Own)
}

/// [`writable_by`] the sandbox's user, or (serve) the user of any other sandbox the gateway
/// serves: one sandbox's user who may write another's policy may open it, or have it send
/// that sandbox's credentials where it likes.
pub fn writable_by_any(what: &'static str, path: &Path, context: &LoadContext) -> Option<Writable> {
    context
        .readers()
        .find_map(|(reader, whose)| judge(what, path, reader, whose))
}

fn judge(
    what: &'static str,
    path: &Path,
    reader: &SandboxReader,
    whose: Whose,
) -> Option<Writable> {
    // Missing now, it could be there when it is read: its directories are judged all the
    // same (who may write one could put the file there in between).
    let meta = std::fs::metadata(path).ok();
    let why = match reader {
        SandboxReader::User { .. } => meta
            .and_then(|meta| crate::unix_reach::writer(path, &meta, reader))
            .map(|w| w.describe(whose.user()))
            .or_else(|| crate::unix_reach::replaceable_by_whom(path, reader, whose.user())),
        SandboxReader::Anyone => match &meta {
            Some(meta) => crate::tunnel::written_by_others(path, meta),
            None => crate::tunnel::replaceable(path),
        }
        .map(|e| {
            format!(
                "{}, and {}, so any user but root may run in it",
                others(&e),
                whose.no_user()
            )
        }),
    }?;
    Some(Writable {
        what,
        path: path.to_owned(),
        why,
        by: whose.command(),
    })
}

/// How others than root could change a file, after "FILE: ".
fn others(e: &Exposure) -> String {
    match e {
        Exposure::Writable { mode } => format!("others than root may write it (mode {mode:o})"),
        Exposure::OwnedByOther { uid } => {
            format!("it is owned by uid {uid}, who may write it whatever its mode")
        }
        Exposure::DirectoryOwned { dir, uid, mode } => format!(
            "directory {} on its way is owned by uid {uid} (mode {mode:o}), who may replace what is in it",
            dir.display()
        ),
        Exposure::DirectoryWritable { dir, mode } => format!(
            "directory {} on its way may be written by others than root (mode {mode:o})",
            dir.display()
        ),
        Exposure::EntryOwned { entry, uid } => format!(
            "{} on its way is owned by uid {uid}, in a directory others may write, so its owner may replace it",
            entry.display()
        ),
        other => other.why(Whose::Own),
    }
}

/// The files of `policy` (read from `policy_file`) that a reload reads again: the policy file,
/// then its upstream CAs.
fn reread<'a>(
    policy_file: &'a Path,
    policy: &'a Policy,
) -> impl Iterator<Item = (&'static str, &'a Path)> {
    std::iter::once((POLICY_FILE, policy_file)).chain(
        policy
            .upstream_ca
            .iter()
            .map(|ca| (UPSTREAM_CA, ca.as_path())),
    )
}

/// At start: a warning for each file that a reload would refuse ([`writable_by_any`]).
pub fn warn_at_start(policy_file: &Path, policy: &Policy, context: &LoadContext) {
    for (what, path) in reread(policy_file, policy) {
        if let Some(w) = writable_by_any(what, path, context) {
            tracing::warn!(sandbox = %policy.name, "{}", w.warning());
        }
    }
}

/// On reload: the first upstream CA of the new `policy` (its file was judged before it was
/// read) that a sandbox's user could have written ([`writable_by_any`]).
pub fn check_upstream_ca(policy: &Policy, context: &LoadContext) -> Result<(), Writable> {
    for ca in &policy.upstream_ca {
        if let Some(w) = writable_by_any(UPSTREAM_CA, ca, context) {
            return Err(w);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{chown, lchown};

    use super::*;
    use crate::test_fs::{Dir, chmod, set_acl};

    const SANDBOX: u32 = 4301;

    fn sandbox() -> SandboxReader {
        SandboxReader::User {
            uid: SANDBOX,
            groups: vec![SANDBOX, 4400],
        }
    }

    fn why(path: &Path, reader: &SandboxReader) -> Option<String> {
        writable_by(POLICY_FILE, path, reader).map(|w| w.why)
    }

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

    /// Missing when judged, the file could be there when it is read: a user who may write
    /// its directory could rename its own policy into place in between (a review won one
    /// reload in eight that way).
    #[test]
    fn a_missing_file_is_judged_by_its_directories() {
        let dir = Dir::new("trusted-missing");
        let file = dir.0.join("p.toml");
        assert_eq!(why(&file, &sandbox()), None);
        assert_eq!(why(&file, &SandboxReader::Anyone), None);
        chown(&dir.0, Some(SANDBOX), None).unwrap();
        assert!(why(&file, &sandbox()).is_some());
        assert!(why(&file, &SandboxReader::Anyone).is_some());
        chown(&dir.0, Some(0), None).unwrap();
        chmod(&dir.0, 0o777);
        assert!(why(&file, &sandbox()).is_some());
        assert!(why(&file, &SandboxReader::Anyone).is_some());
    }

    #[test]
    fn a_file_the_sandbox_user_may_write_or_replace_is_judged_writable() {
        let dir = Dir::new("trusted-user");
        let file = dir.0.join("p.toml");
        std::fs::write(&file, "").unwrap();
        chmod(&file, 0o644);
        let user = sandbox();
        assert_eq!(why(&file, &user), None);
        // Its own, whatever the mode: it may chmod it.
        chown(&file, Some(SANDBOX), None).unwrap();
        chmod(&file, 0o400);
        assert_eq!(
            why(&file, &user).as_deref(),
            Some("it is owned by uid 4301, the sandbox's user")
        );
        // Another (unsandboxed) user's file: not the sandbox's to write.
        chown(&file, Some(SANDBOX + 1), None).unwrap();
        chmod(&file, 0o644);
        assert_eq!(why(&file, &user), None);
        chown(&file, Some(0), Some(4400)).unwrap();
        chmod(&file, 0o664);
        assert_eq!(
            why(&file, &user).as_deref(),
            Some("group 4400, a group of the sandbox's user, may write it (mode 664)")
        );
        // Another group's: not the sandbox's user's, unless an ACL says so.
        chown(&file, Some(0), Some(4500)).unwrap();
        assert_eq!(why(&file, &user), None);
        set_acl(
            &file,
            &[
                (0x01, 6, u32::MAX),
                (0x02, 6, SANDBOX),
                (0x04, 4, u32::MAX),
                (0x10, 6, u32::MAX),
                (0x20, 4, u32::MAX),
            ],
        );
        assert_eq!(
            why(&file, &user).as_deref(),
            Some("it has an access ACL that may let the sandbox's user write it (mode 664)")
        );
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, "").unwrap();
        chmod(&file, 0o646);
        assert_eq!(
            why(&file, &user).as_deref(),
            Some("everyone may write it (mode 646)")
        );
        chmod(&file, 0o644);
        // A directory on the way it may write: it could put another file in its place.
        chmod(&dir.0, 0o777);
        assert_eq!(
            why(&file, &user),
            Some(format!(
                "the sandbox's user may write directory {} (mode 777, uid 0)",
                dir.0.display()
            ))
        );
        // Sticky, as /tmp: root's entries stay root's; one of its own there does not.
        chmod(&dir.0, 0o1777);
        assert_eq!(why(&file, &user), None);
        let sub = dir.0.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let inner = sub.join("p.toml");
        std::fs::write(&inner, "").unwrap();
        assert_eq!(why(&inner, &user), None);
        lchown(&sub, Some(SANDBOX), None).unwrap();
        assert!(why(&inner, &user).is_some());
        chmod(&dir.0, 0o755);
        // A link to root's file, in a directory the sandbox's user may write.
        let hop = Dir(dir.0.with_extension("hop"));
        std::fs::create_dir(&hop.0).unwrap();
        chmod(&hop.0, 0o777);
        let link = hop.0.join("p.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let w = why(&link, &user).unwrap();
        assert!(w.contains(&hop.0.display().to_string()), "{w}");
    }

    #[test]
    fn without_a_user_only_root_may_write_it_or_a_directory_on_its_way() {
        let dir = Dir::new("trusted-anyone");
        let file = dir.0.join("p.toml");
        std::fs::write(&file, "").unwrap();
        chmod(&file, 0o644);
        let anyone = SandboxReader::Anyone;
        assert_eq!(why(&file, &anyone), None);
        let no_user = ", and the sandbox has no `user`, so any user but root may run in it";
        chown(&file, Some(SANDBOX), None).unwrap();
        assert_eq!(
            why(&file, &anyone),
            Some(format!(
                "it is owned by uid 4301, who may write it whatever its mode{no_user}"
            ))
        );
        chown(&file, Some(0), Some(4400)).unwrap();
        chmod(&file, 0o664);
        assert_eq!(
            why(&file, &anyone),
            Some(format!("others than root may write it (mode 664){no_user}"))
        );
        chmod(&file, 0o644);
        // Another's directory in /tmp: its owner may replace it (sticky: only the owner).
        chown(&dir.0, Some(SANDBOX), None).unwrap();
        assert_eq!(
            why(&file, &anyone),
            Some(format!(
                "{} on its way is owned by uid 4301, in a directory others may write, so its owner may replace it{no_user}",
                dir.0.display()
            ))
        );
        chown(&dir.0, Some(0), None).unwrap();
        let sub = dir.0.join("sub");
        std::fs::create_dir(&sub).unwrap();
        chown(&sub, Some(SANDBOX), None).unwrap();
        let inner = sub.join("p.toml");
        std::fs::write(&inner, "").unwrap();
        assert_eq!(
            why(&inner, &anyone),
            Some(format!(
                "directory {} on its way is owned by uid 4301 (mode 755), who may replace what is in it{no_user}",
                sub.display()
            ))
        );
        chmod(&dir.0, 0o775);
        assert_eq!(
            why(&file, &anyone),
            Some(format!(
                "directory {} on its way may be written by others than root (mode 775){no_user}",
                dir.0.display()
            ))
        );
        chmod(&dir.0, 0o755);
        // Missing: not judged here (reading it says why).
        assert_eq!(why(&dir.0.join("missing"), &anyone), None);
    }

    #[test]
    fn the_refusal_and_the_warning_say_what_to_do() {
        let w = Writable {
            what: POLICY_FILE,
            path: PathBuf::from("/srv/a.toml"),
            why: "it is owned by uid 4301, the sandbox's user".into(),
            by: "the sandboxed command",
        };
        let fix = "keep it where only root may write: chown root:root /srv/a.toml && chmod go-w /srv/a.toml (and setfacl -b /srv/a.toml if it has an access ACL), in directories only root may write (such as /etc/gateway)";
        assert_eq!(
            w.to_string(),
            format!(
                "policy file /srv/a.toml: it is owned by uid 4301, the sandbox's user, so the sandboxed command could have rewritten it: it is not reloaded; {fix}, then send SIGHUP again"
            )
        );
        assert_eq!(
            w.warning(),
            format!(
                "policy file /srv/a.toml: it is owned by uid 4301, the sandbox's user, so the sandboxed command could rewrite it: SIGHUP reloads of this file will be refused; {fix}"
            )
        );
    }

    #[test]
    fn a_policy_s_upstream_cas_are_judged_too() {
        let dir = Dir::new("trusted-ca");
        let ca = dir.0.join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        chmod(&ca, 0o644);
        let mut policy =
            crate::policy::check_text(Path::new("p.toml"), "version = 1\nname = \"x\"\n")
                .unwrap()
                .policy;
        policy.upstream_ca = vec![ca.clone()];
        let context = LoadContext {
            sandbox: sandbox(),
            ..LoadContext::for_test()
        };
        assert_eq!(check_upstream_ca(&policy, &context), Ok(()));
        chown(&ca, Some(SANDBOX), None).unwrap();
        let e = check_upstream_ca(&policy, &context).unwrap_err();
        assert_eq!(e.what, UPSTREAM_CA);
        assert_eq!(e.path, ca);
        assert!(
            e.to_string().starts_with(&format!(
                "[tls] upstream_ca {}: it is owned by uid 4301",
                ca.display()
            )),
            "{e}"
        );
    }

    /// Under serve, another sandbox's user who may write a sandbox's policy file is refused
    /// too, and a sandbox without `user` among the others leaves only root's files.
    #[test]
    fn under_serve_every_sandbox_s_user_is_judged() {
        let dir = Dir::new("trusted-others");
        let file = dir.0.join("a.toml");
        std::fs::write(&file, "").unwrap();
        chmod(&file, 0o644);
        let other = SandboxReader::User {
            uid: SANDBOX + 1,
            groups: vec![SANDBOX + 1],
        };
        let context = |others: Vec<SandboxReader>| LoadContext {
            sandbox: sandbox(),
            others,
            ..LoadContext::for_test()
        };
        assert_eq!(
            writable_by_any(POLICY_FILE, &file, &context(vec![other.clone()])),
            None
        );
        chown(&file, Some(SANDBOX + 1), None).unwrap();
        // Not this sandbox's user's: alone, it passes; with the other sandbox, it does not.
        assert_eq!(writable_by(POLICY_FILE, &file, &sandbox()), None);
        let w = writable_by_any(POLICY_FILE, &file, &context(vec![other])).unwrap();
        assert_eq!(
            w.why,
            "it is owned by uid 4302, the user of another sandbox this gateway serves"
        );
        assert_eq!(w.by, "a command in another sandbox");
        assert!(
            w.to_string()
                .contains("so a command in another sandbox could have rewritten it"),
            "{w}"
        );
        let w = writable_by_any(POLICY_FILE, &file, &context(vec![SandboxReader::Anyone])).unwrap();
        assert_eq!(
            w.why,
            "it is owned by uid 4302, who may write it whatever its mode, and another sandbox this gateway serves has no `user`, so any user but root may run in it"
        );
        chown(&file, Some(0), None).unwrap();
        assert_eq!(
            writable_by_any(POLICY_FILE, &file, &context(vec![SandboxReader::Anyone])),
            None
        );
    }
}
