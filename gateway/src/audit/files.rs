//! The log file and its rotated siblings: `FILE.1` is the newest rotated file, `FILE.N` the
//! oldest; any of them may be gzip-compressed as `FILE.N.gz` (by logrotate, say).

use std::{
    ffi::OsString,
    fs::File,
    io::{self, BufRead, BufReader, Read as _},
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use flate2::read::MultiGzDecoder;

use super::{
    chain::Tail,
    trust::{self, OpenError, Problem, Reader},
};

/// Rotated files kept: `FILE.1` … `FILE.KEEP`; the oldest beyond is deleted.
pub const KEEP: u32 = 10;

/// `FILE.n`, or `FILE.n.gz`.
pub fn rotated(path: &Path, n: u32, gz: bool) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}{}", if gz { ".gz" } else { "" }));
    PathBuf::from(name)
}

/// Makes room for a new `FILE.1`: deletes `FILE.KEEP`, renames `FILE.n` to `FILE.n+1`.
pub fn shift(path: &Path) -> io::Result<()> {
    for gz in [false, true] {
        remove_if_there(&rotated(path, KEEP, gz))?;
    }
    for n in (1..KEEP).rev() {
        for gz in [false, true] {
            let from = rotated(path, n, gz);
            match std::fs::rename(&from, rotated(path, n + 1, gz)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The log and its rotated siblings, oldest first: `FILE.N[.gz]` … `FILE.1[.gz]`, `FILE`.
/// An error when none of them exists.
pub fn chronological(path: &Path) -> io::Result<Vec<PathBuf>> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut siblings = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| with_path(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| with_path(dir, e))?;
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(name.as_str()))
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        let (digits, gz) = match rest.strip_suffix(".gz") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(n) = digits.parse::<u32>() else {
            continue;
        };
        siblings.push((n, gz, path.with_file_name(&file_name)));
    }
    // Oldest (highest number) first; a plain file before its compressed twin.
    siblings.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut files: Vec<PathBuf> = siblings.into_iter().map(|(_, _, p)| p).collect();
    // A link there too, dangling or not: the reader warns of it rather than pass it over.
    if path.symlink_metadata().is_ok() {
        files.push(path.to_owned());
    }
    if files.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no audit log at {} (nor rotated files next to it)",
                path.display()
            ),
        ));
    }
    Ok(files)
}

/// The log's files, split by whether `gateway audit` may read them.
#[derive(Debug, Default)]
pub struct Trusted {
    /// Oldest first, each opened: together they are the log as it was at one moment.
    pub read: Vec<(PathBuf, File)>,
    /// A symbolic link, not a regular file, owned by neither root nor whoever reads, or
    /// writable by group or others: anyone could have written its records.
    pub refused: Vec<(PathBuf, Problem)>,
}

/// Times the files are listed and opened again when a rotation moved them meanwhile.
const ATTEMPTS: usize = 20;

/// Opens the log at `path` and its rotated files (see [`chronological`]), split into those
/// to read and those to refuse.
///
/// All are opened before any is read, and kept only if no rotation renamed one between the
/// listing and the last open: a file list read lazily could skip a file a rotation renamed
/// under it, or read one twice, which `verify` would report as records removed or out of
/// order in a log nobody touched.
pub fn open_trusted(path: &Path) -> io::Result<Trusted> {
    open_trusted_with(path, |_| {})
}

/// [`open_trusted`], calling `before_open(i)` before the `i`-th file is opened (where a
/// test rotates the log).
fn open_trusted_with(path: &Path, mut before_open: impl FnMut(usize)) -> io::Result<Trusted> {
    'attempt: for _ in 0..ATTEMPTS {
        let names = chronological(path)?;
        let mut split = Trusted::default();
        for (i, name) in names.iter().enumerate() {
            before_open(i);
            match trust::open_read(name, Reader::Auditor) {
                Ok(file) => split.read.push((name.clone(), file)),
                Err(OpenError::Untrusted(problem)) => split.refused.push((name.clone(), problem)),
                // Renamed or deleted since the listing: a rotation.
                Err(OpenError::Io(e)) if e.kind() == io::ErrorKind::NotFound => continue 'attempt,
                Err(OpenError::Io(e)) => return Err(with_path(name, e)),
            }
        }
        if still_named(path, &names, &split.read)? {
            return Ok(split);
        }
    }
    Err(io::Error::other(format!(
        "{}: the log was rotated while its files were being opened, {ATTEMPTS} times running; run the command again",
        path.display()
    )))
}

/// Whether the log's files are still `names`, and each file opened still under its name.
fn still_named(path: &Path, names: &[PathBuf], opened: &[(PathBuf, File)]) -> io::Result<bool> {
    if chronological(path)? != names {
        return Ok(false);
    }
    for (name, file) in opened {
        let now = match std::fs::symlink_metadata(name) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(with_path(name, e)),
        };
        let held = file.metadata().map_err(|e| with_path(name, e))?;
        if (now.dev(), now.ino()) != (held.dev(), held.ino()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn open_reader(path: &Path, reader: Reader) -> io::Result<Box<dyn BufRead>> {
    let file = trust::open_read(path, reader).map_err(|e| match e {
        OpenError::Io(e) => with_path(path, e),
        untrusted => untrusted.at(path),
    })?;
    Ok(buffered(path, file))
}

/// `file`, decompressed when `path` names a `.gz` file.
fn buffered(path: &Path, file: File) -> Box<dyn BufRead> {
    if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    }
}

/// One line of the log, without its newline.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Index of its file in the list given to [`Lines::new`].
    pub file: usize,
    /// 1-based line number within that file.
    pub number: usize,
    pub bytes: Vec<u8>,
    /// Whether a newline ended it (only the last line of a file can lack one).
    pub terminated: bool,
}

/// Every line of a list of opened files, in order, decompressing `.gz` files.
pub struct Lines {
    files: Vec<(PathBuf, Option<File>)>,
    next_file: usize,
    current: Option<(usize, Box<dyn BufRead>, usize)>,
}

impl Lines {
    /// `files`: from [`open_trusted`], oldest first.
    pub fn new(files: Vec<(PathBuf, File)>) -> Self {
        Self {
            files: files.into_iter().map(|(p, f)| (p, Some(f))).collect(),
            next_file: 0,
            current: None,
        }
    }
}

impl Iterator for Lines {
    type Item = io::Result<LogLine>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let (path, file) = self.files.get_mut(self.next_file)?;
                let reader = buffered(path, file.take()?);
                self.current = Some((self.next_file, reader, 0));
                self.next_file += 1;
            }
            let (file, reader, number) = self.current.as_mut()?;
            let mut bytes = Vec::new();
            match reader.read_until(b'\n', &mut bytes) {
                Ok(0) => self.current = None,
                Ok(_) => {
                    *number += 1;
                    let terminated = bytes.last() == Some(&b'\n');
                    if terminated {
                        bytes.pop();
                    }
                    return Some(Ok(LogLine {
                        file: *file,
                        number: *number,
                        bytes,
                        terminated,
                    }));
                }
                Err(e) => {
                    let e = with_path(&self.files[*file].0, e);
                    self.current = None;
                    self.next_file = self.files.len();
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The end of an open file of `size` bytes, read backwards until it holds two complete lines.
pub fn tail_of_file(file: &File, size: u64) -> io::Result<Tail> {
    const CHUNK: u64 = 16 * 1024;
    // A record is a few hundred bytes; past this the lines are not records anyway.
    const LIMIT: u64 = 16 * 1024 * 1024;
    let mut start = size;
    let mut data = Vec::new();
    loop {
        let newlines = data
            .strip_suffix(b"\n")
            .unwrap_or(&data)
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        if start == 0 || newlines >= 2 || data.len() as u64 >= LIMIT {
            return Ok(Tail::of(&data, start == 0));
        }
        let take = CHUNK.min(start);
        start -= take;
        let mut chunk = vec![0; take as usize];
        file.read_exact_at(&mut chunk, start)?;
        chunk.extend_from_slice(&data);
        data = chunk;
    }
}

/// The end of a rotated file (plain or gzip), read whole; only the writer's own file that
/// nobody else may write (the chain goes on from it).
pub fn tail_of_path(path: &Path) -> io::Result<Tail> {
    let mut data = Vec::new();
    open_reader(path, Reader::Writer)?
        .read_to_end(&mut data)
        .map_err(|e| with_path(path, e))?;
    Ok(Tail::of(&data, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gateway-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn siblings_come_oldest_first() {
        let dir = scratch("siblings");
        let log = dir.join("audit.jsonl");
        for name in [
            "audit.jsonl",
            "audit.jsonl.1",
            "audit.jsonl.2.gz",
            "audit.jsonl.10",
            "audit.jsonl.x",
            "audit.jsonl.1.bak",
            "other.jsonl.3",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let names: Vec<String> = chronological(&log)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "audit.jsonl.10",
                "audit.jsonl.2.gz",
                "audit.jsonl.1",
                "audit.jsonl"
            ]
        );
        assert!(chronological(&dir.join("none.jsonl")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shift_keeps_ten() {
        let dir = scratch("shift");
        let log = dir.join("a.jsonl");
        for n in 1..=KEEP {
            std::fs::write(rotated(&log, n, n == 3), n.to_string()).unwrap();
        }
        shift(&log).unwrap();
        assert!(!rotated(&log, 1, false).exists());
        assert_eq!(
            std::fs::read_to_string(rotated(&log, 2, false)).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(rotated(&log, 4, true)).unwrap(),
            "3"
        );
        assert_eq!(
            std::fs::read_to_string(rotated(&log, KEEP, false)).unwrap(),
            (KEEP - 1).to_string()
        );
        assert!(!rotated(&log, KEEP + 1, false).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn opened(paths: Vec<PathBuf>) -> Vec<(PathBuf, File)> {
        paths
            .into_iter()
            .map(|p| {
                let f = File::open(&p).unwrap();
                (p, f)
            })
            .collect()
    }

    #[test]
    fn lines_cross_files_and_gzip() {
        use std::io::Write as _;
        let dir = scratch("lines");
        let plain = dir.join("a");
        std::fs::write(&plain, "one\ntwo\n").unwrap();
        let gz = dir.join("b.gz");
        let mut enc = flate2::write::GzEncoder::new(
            File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        enc.write_all(b"three\nfour").unwrap();
        enc.finish().unwrap();
        let lines: Vec<LogLine> = Lines::new(opened(vec![plain, gz]))
            .collect::<io::Result<_>>()
            .unwrap();
        let seen: Vec<(usize, usize, &[u8], bool)> = lines
            .iter()
            .map(|l| (l.file, l.number, &l.bytes[..], l.terminated))
            .collect();
        assert_eq!(
            seen,
            [
                (0, 1, &b"one"[..], true),
                (0, 2, &b"two"[..], true),
                (1, 1, &b"three"[..], true),
                (1, 2, &b"four"[..], false),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tail_of_a_long_file_reads_back_far_enough() {
        let dir = scratch("tail");
        let path = dir.join("t");
        let long = "x".repeat(40_000);
        std::fs::write(&path, format!("first\n{long}\nlast")).unwrap();
        let file = File::open(&path).unwrap();
        let tail = tail_of_file(&file, file.metadata().unwrap().len()).unwrap();
        assert_eq!(tail.before.as_deref(), Some(long.as_bytes()));
        assert_eq!(tail.last.as_deref(), Some(&b"last"[..]));
        assert!(!tail.terminated);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_others_could_have_written_are_not_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = scratch("trusted");
        let log = dir.join("audit.jsonl");
        std::fs::write(&log, "").unwrap();
        let writable = rotated(&log, 1, false);
        std::fs::write(&writable, "").unwrap();
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o664)).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let link = rotated(&log, 2, true);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let fifo = rotated(&log, 3, false);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let split = open_trusted(&log).unwrap();
        let read: Vec<&PathBuf> = split.read.iter().map(|(p, _)| p).collect();
        assert_eq!(read, [&log]);
        assert_eq!(
            split.refused,
            [
                (fifo, Problem::NotRegular),
                (link, Problem::Symlink),
                (writable, Problem::Writable { mode: 0o664 }),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rotation between listing the files and opening the last of them: what is read is
    /// the log after the rotation, every record once and in order, not the file the
    /// rotation moved away followed by the new one.
    #[test]
    fn a_rotation_while_the_files_are_opened_is_not_read_across() {
        let dir = scratch("rotating");
        let log = dir.join("audit.jsonl");
        std::fs::write(rotated(&log, 1, false), "a\n").unwrap();
        std::fs::write(&log, "b\n").unwrap();
        let mut rotations = 0;
        let split = open_trusted_with(&log, |i| {
            if i == 1 && rotations == 0 {
                rotations += 1;
                shift(&log).unwrap();
                std::fs::rename(&log, rotated(&log, 1, false)).unwrap();
                std::fs::write(&log, "c\n").unwrap();
            }
        })
        .unwrap();
        assert!(split.refused.is_empty());
        let read: Vec<String> = Lines::new(split.read)
            .map(|l| String::from_utf8(l.unwrap().bytes).unwrap())
            .collect();
        assert_eq!(read, ["a", "b", "c"]);
        // A log rotating all the time is an error, not a guess.
        let e = open_trusted_with(&log, |_| {
            shift(&log).unwrap();
            std::fs::rename(&log, rotated(&log, 1, false)).unwrap();
            std::fs::write(&log, "d\n").unwrap();
        })
        .unwrap_err();
        assert!(e.to_string().contains("run the command again"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
