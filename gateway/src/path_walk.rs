//! A path looked up the way the kernel opens it: name by name from the root, each in the
//! directory the names before it led to, symbolic links followed where they stand. Who may
//! change any of those directories or entries may change what the path opens, whatever the
//! path's own text says.

use std::{
    collections::VecDeque,
    ffi::OsString,
    fs::Metadata,
    path::{Component, Path, PathBuf},
};

/// As many links as the kernel follows on one path before it gives up (ELOOP).
const MAX_LINKS: usize = 40;

/// One name looked up: in `dir`, the entry `entry`, not there when `found` is `None`.
pub struct Lookup<'a> {
    pub dir: &'a Path,
    pub dir_meta: &'a Metadata,
    pub entry: &'a Path,
    pub found: Option<&'a Metadata>,
}

/// The first `Some` that `judge` returns for a lookup on the way to `path`; `None` once the
/// path ends, a name is missing (after judging its lookup) or the way cannot be followed.
pub fn first<T>(path: &Path, mut judge: impl FnMut(Lookup<'_>) -> Option<T>) -> Option<T> {
    let mut pending = names(&std::path::absolute(path).ok()?);
    let mut at = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            at.pop();
            continue;
        }
        let dir_meta = std::fs::metadata(&at).ok()?;
        let entry = at.join(&name);
        let found = std::fs::symlink_metadata(&entry).ok();
        if let Some(verdict) = judge(Lookup {
            dir: &at,
            dir_meta: &dir_meta,
            entry: &entry,
            found: found.as_ref(),
        }) {
            return Some(verdict);
        }
        let meta = found?;
        if !meta.file_type().is_symlink() {
            at = entry;
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return None;
        }
        let target = std::fs::read_link(&entry).ok()?;
        if target.is_absolute() {
            at = PathBuf::from("/");
        }
        for name in names(&target).into_iter().rev() {
            pending.push_front(name);
        }
    }
    None
}

/// The names on `path`, `..` kept, the root and `.` left out.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}
