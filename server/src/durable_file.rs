//! Small metadata files of a data directory (the oracle's ceiling, the
//! shard count, the history id), replaced whole.
//!
//! A file is never rewritten in place: the new contents go to a file
//! beside it, which is synced, renamed over the old one, and the directory
//! synced. A crash at any point leaves the old contents or the new ones,
//! never an empty or half-written file, so a reader may refuse a file it
//! cannot parse instead of guessing.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` (see the module docs).
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_holds_the_new_contents_and_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        replace(&path, b"1\n").unwrap();
        replace(&path, b"22\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "22\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("meta")]);
    }
}
