//! A small file system the test mounts itself (tmpfs with `size=`), to fill up on
//! purpose: for the disk-full tests (issue 11, point 4). Needs root (CI runs as root);
//! [`Tmpfs::mount`] returns None with a printed reason otherwise, and the caller skips.
//! Unmounted (lazily, `MNT_DETACH`) when dropped, even after a failed assertion.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB over the (empty) directory `path`.
    pub fn mount(path: &Path, mib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: mounting a small tmpfs needs root (CI runs as root)");
            return None;
        }
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let opts = std::ffi::CString::new(format!("size={mib}m,mode=0700")).unwrap();
        // SAFETY: mount(2) with valid C strings we own.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            println!(
                "SKIPPED: cannot mount a tmpfs on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Free bytes for an unprivileged writer (tenso's own view).
    pub fn free(&self) -> u64 {
        tenso::disk::free_space(&self.path).unwrap()
    }

    /// Writes a filler file until at most `leave` bytes stay free; returns its path.
    /// With `leave = 0` it writes until ENOSPC (in shrinking chunks, down to 1 byte).
    pub fn fill(&self, leave: u64) -> PathBuf {
        let p = self.path.join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let mut chunk: usize = 1 << 20;
        // Bounded: at most a few thousand writes for the few MiB a test mounts.
        for _ in 0..100_000 {
            let free = self.free();
            if leave > 0 && free <= leave {
                break;
            }
            let want = if leave > 0 {
                chunk.min((free - leave) as usize)
            } else {
                chunk
            };
            match f.write_all(&vec![0u8; want.max(1)]) {
                Ok(()) => {}
                Err(_) if chunk > 1 => chunk /= 4,
                Err(_) => break,
            }
        }
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: umount2(2) of the mount we made.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}
