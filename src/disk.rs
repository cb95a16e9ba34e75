//! File-system rules every store follows: modes that do not depend on the umask,
//! directories that are durable before anything in them is relied on, and free space.
//!
//! - Modes: directories 0700 and files 0600 unless a caller asks for a group-readable
//!   [`Modes`] (the pool, for an IMAP server's group). Every create sets the mode
//!   explicitly after the fact (`chmod`/`fchmod`), so a umask can only be irrelevant.
//! - Durability: [`create_dir_durable`] creates missing directories one level at a time
//!   and fsyncs each parent after the `mkdir`, so a crash cannot lose a directory that a
//!   later fsynced file (and its 250) lives in.
//! - Space: [`free_space`] is one `statvfs(2)`; [`is_no_space`] tells ENOSPC/EDQUOT apart.
//!
//! Blocking I/O only: callers run it off the async workers. Knows nothing of mail.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Modes (and optionally a group) for one tree of tenso's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub dir: u32,
    pub file: u32,
    /// Group to give new files and directories (group-readable trees only).
    pub gid: Option<u32>,
}

/// Owner-only: everything but a group-readable pool.
pub const PRIVATE: Modes = Modes {
    dir: 0o700,
    file: 0o600,
    gid: None,
};

impl Modes {
    /// Directories 0750 and files 0640 owned by `gid` (e.g. Dovecot's group on the pool).
    pub fn group_readable(gid: u32) -> Modes {
        Modes {
            dir: 0o750,
            file: 0o640,
            gid: Some(gid),
        }
    }
}

fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// Gives an existing directory its mode (and group), whatever the umask made of it.
pub fn set_dir_mode(path: &Path, m: Modes) -> io::Result<()> {
    if let Some(g) = m.gid {
        chown_group(path, g)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(m.dir))
}

/// fsyncs a directory, making the names in it durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Creates `path` and every missing parent with mode `m.dir`; after each `mkdir` the
/// parent is fsynced, so the new name is durable before anything inside is written.
/// An existing directory is left as it is (see [`tighten`] for existing trees).
pub fn create_dir_durable(path: &Path, m: Modes) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = path;
    while !p.is_dir() {
        missing.push(p);
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    for dir in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(m.dir).create(dir) {
            Ok(()) => {}
            // Another thread created it meanwhile: it made (and synced) it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => continue,
            Err(e) => return Err(e),
        }
        set_dir_mode(dir, m)?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
    }
    Ok(())
}

/// Creates a new file for writing with mode `m.file` (set with `fchmod`, so the umask
/// does not matter). `truncate` replaces a stale file of the same name (a temp file
/// left by a crash); otherwise an existing file is an error.
pub fn create_file(path: &Path, m: Modes, truncate: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).mode(m.file);
    if truncate {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let f = o.open(path)?;
    if let Some(g) = m.gid {
        std::os::unix::fs::fchown(&f, None, Some(g))?;
    }
    f.set_permissions(fs::Permissions::from_mode(m.file))?;
    Ok(f)
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: statvfs(3) fills the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// True for "the disk (or the quota) is full".
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
}

/// Walks an existing tree and takes away every permission beyond `m` (files and
/// directories created by other code, e.g. sled, or by an older tenso under a loose
/// umask). Symbolic links are not followed. Returns how many modes were changed.
pub fn tighten(root: &Path, m: Modes) -> io::Result<usize> {
    let mut fixed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let want = if md.is_dir() {
            m.dir
        } else if md.is_file() {
            m.file
        } else {
            // Sockets keep their own mode (the admin socket is 0600); links have none.
            continue;
        };
        let mode = md.mode() & 0o7777;
        // Keep setgid on directories (a group-readable pool may rely on it).
        let keep = mode & 0o2000 & if md.is_dir() { 0o2000 } else { 0 };
        if mode & !(want | keep) != 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode((mode & want) | keep))?;
            fixed += 1;
        }
        if let Some(g) = m.gid
            && md.gid() != g
        {
            chown_group(&p, g)?;
        }
        if md.is_dir() {
            for e in fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(fixed)
}

/// Walks an existing tree and gives every directory and file exactly the modes (and
/// group) of `m`: for a group-readable tree, which [`tighten`] would never widen.
/// Returns how many entries changed.
pub fn apply(root: &Path, m: Modes) -> io::Result<usize> {
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let want = match (md.is_dir(), md.is_file()) {
            (true, _) => m.dir,
            (_, true) => m.file,
            _ => continue,
        };
        if md.mode() & 0o7777 != want || m.gid.is_some_and(|g| g != md.gid()) {
            if let Some(g) = m.gid {
                chown_group(&p, g)?;
            }
            fs::set_permissions(&p, fs::Permissions::from_mode(want))?;
            changed += 1;
        }
        if md.is_dir() {
            for e in fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(changed)
}

/// The owner, group and permission bits of `path` (no symlink following).
pub fn owner_and_mode(path: &Path) -> io::Result<(u32, u32, u32)> {
    let md = fs::symlink_metadata(path)?;
    Ok((md.uid(), md.gid(), md.mode() & 0o7777))
}

/// The gid of a group name (for `[pool] group`).
pub fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam_r with buffers we own; the result pointer is checked before use.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out);
        (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        owner_and_mode(p).unwrap().2
    }

    #[test]
    fn modes_ignore_the_umask() {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: umask(2) only; tests in this binary create files with explicit modes.
        let old = unsafe { libc::umask(0o000) };
        let deep = d.path().join("a/b/c");
        create_dir_durable(&deep, PRIVATE).unwrap();
        let f = d.path().join("a/f");
        drop(create_file(&f, PRIVATE, false).unwrap());
        unsafe { libc::umask(old) };
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&d.path().join(p)), 0o700, "{p}");
        }
        assert_eq!(mode(&f), 0o600);
        assert!(
            create_file(&f, PRIVATE, false).is_err(),
            "no silent overwrite"
        );
    }

    #[test]
    fn tighten_takes_away_extra_bits_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/x"), b"x").unwrap();
        fs::write(root.join("y"), b"y").unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(root.join("sub/x"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::set_permissions(root.join("y"), fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(tighten(&root, PRIVATE).unwrap(), 3);
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("sub")), 0o700);
        assert_eq!(mode(&root.join("sub/x")), 0o600);
        assert_eq!(mode(&root.join("y")), 0o400, "never widened");
        assert_eq!(tighten(&root, PRIVATE).unwrap(), 0);
    }

    #[test]
    fn free_space_and_no_space() {
        let d = tempfile::tempdir().unwrap();
        assert!(free_space(d.path()).unwrap() > 0);
        assert!(free_space(&d.path().join("missing")).is_err());
        assert!(is_no_space(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_no_space(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(!is_no_space(&io::Error::from_raw_os_error(libc::EIO)));
    }
}
