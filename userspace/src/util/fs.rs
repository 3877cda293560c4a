//! File helpers.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically (a temporary file beside it,
/// then rename): readers see the old content or the new, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::File::create(&tmp)?.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Like [`write_atomic`], with an empty file made ahead (`spare`, beside
/// `path`) as the temporary one: written over, then renamed to `path`. No
/// new inode, which is what costs on some filesystems (ext4 without a
/// journal looks past recently deleted inodes for a free one). Ok(false):
/// `spare` is not there, nothing was written.
pub fn write_atomic_through(spare: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    match fill_in(spare, bytes) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    std::fs::rename(spare, path)?;
    Ok(true)
}

/// Writes `bytes` over the existing file `path` (made ahead, its mode
/// already set): no new inode. NotFound when it is not there.
pub fn fill_in(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::OpenOptions::new().write(true).truncate(true).open(path)?.write_all(bytes)
}

/// Removes every entry of `dir` (file or directory) whose name starts
/// with `prefix`; returns how many went.
pub fn remove_entries_prefixed(dir: &Path, prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter(|e| {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path).is_ok(),
                _ => std::fs::remove_file(&path).is_ok(),
            }
        })
        .count()
}
