//! Files only runhook's user may read: the state database, its lock and
//! file sinks hold event payloads and labels, which may be confidential.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Opens `path` with `options`, creating its directory first; a file this
/// creates is `0600`. An existing file keeps its mode: an operator who
/// widened it (a log shipper's group) meant to.
pub fn open_private(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(options, 0o600);
    options.open(path)
}
