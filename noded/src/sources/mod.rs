//! Hardware sources: the only code in ergond that reads counters from the machine.
//!
//! Each source takes its root directory (or library path) as a parameter, so tests and demo
//! setups point it at generated trees (the `ergon-testkit` crate) or at the fake NVML library.
//! Sources return raw counter values with monotonic timestamps; turning them into energy is the
//! job of [`crate::counter`].

pub mod cgroup;
pub mod domains;
pub mod meter;
pub mod nvml;
pub mod perf;
pub mod rapl;
pub mod topology;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A small kernel-generated file (sysfs attribute, procfs, cgroupfs) kept open and re-read with
/// `pread` at offset 0. Re-reading an open sysfs/procfs/cgroupfs file from offset 0 makes the
/// kernel regenerate its contents, so one `open` serves every tick: a read costs one syscall
/// instead of three (open, read, close) and no path lookup.
#[derive(Debug)]
pub struct KernelFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl KernelFile {
    /// Open `path` for repeated reads.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: File::open(path)?,
            buf: vec![0; 256],
        })
    }

    /// The path this file was opened from (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the whole current contents (growing the buffer if the file is larger than before).
    pub fn read(&mut self) -> io::Result<&[u8]> {
        Ok(self.read_with_path()?.1)
    }

    /// [`Self::read`], also lending the path, so that callers can name the file in an error
    /// while they hold the contents (without copying the path on every read).
    pub fn read_with_path(&mut self) -> io::Result<(&Path, &[u8])> {
        let mut len = 0;
        loop {
            if len == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.file.read_at(&mut self.buf[len..], len as u64)?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok((&self.path, &self.buf[..len]))
    }

    /// Read the file as one unsigned decimal integer (surrounding whitespace allowed).
    pub fn read_u64(&mut self) -> io::Result<u64> {
        let (path, bytes) = self.read_with_path()?;
        parse_u64(bytes).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: expected an unsigned integer, found {:?}",
                    path.display(),
                    String::from_utf8_lossy(bytes)
                ),
            )
        })
    }
}

/// Parse ASCII decimal digits with optional surrounding whitespace, without allocating.
pub(crate) fn parse_u64(bytes: &[u8]) -> Option<u64> {
    let s = bytes.trim_ascii();
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Read a small text file whole, trimmed (for description files read once at start).
pub(crate) fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parse_u64_accepts_sysfs_formats() {
        assert_eq!(parse_u64(b"12345\n"), Some(12345));
        assert_eq!(parse_u64(b"  7 "), Some(7));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"0x10"), None);
    }

    #[test]
    fn kernel_file_rereads_new_contents_from_offset_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("energy_uj");
        std::fs::write(&p, "100\n").unwrap();
        let mut f = KernelFile::open(&p).unwrap();
        assert_eq!(f.read_u64().unwrap(), 100);
        // Rewrite in place (same inode), like the kernel regenerating the attribute.
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        w.write_all("123456789012345678\n".repeat(40).as_bytes())
            .unwrap();
        assert_eq!(f.read().unwrap().len(), 19 * 40);
        std::fs::write(&p, "42").unwrap();
        assert_eq!(f.read_u64().unwrap(), 42);
    }
}
