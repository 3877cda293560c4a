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
    let mut file = match std::fs::OpenOptions::new().write(true).truncate(true).open(spare) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    file.write_all(bytes)?;
    std::fs::rename(spare, path)?;
    Ok(true)
}
