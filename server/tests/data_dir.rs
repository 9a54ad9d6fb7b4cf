//! The server binary against a data directory's shard count file: kept
//! across starts, refused when it would place keys differently, recovered
//! from the shard directories when an older version left it empty.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// Starts the server on `dir` with `--shards n`; `Ok` once it is ready
/// (then stopped), `Err(stderr)` if it exits first.
fn start(dir: &Path, shards: u32) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_metastore-server"))
        .args(["--engine", "rocksdb", "--port", "0", "--host", "127.0.0.1"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--shards")
        .arg(shards.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start metastore-server");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        if line
            .expect("server stdout")
            .contains("metastore-server ready")
        {
            child.kill().unwrap();
            child.wait().unwrap();
            return Ok(());
        }
    }
    let out = child.wait_with_output().expect("server exit");
    Err(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_shard_count_is_kept_and_a_damaged_file_is_not_guessed_past() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    start(&data, 2).expect("first start");
    let refused = start(&data, 3).unwrap_err();
    assert!(refused.contains("holds data for 2 shards"), "{refused}");
    // An older version rewrote the file in place: a crash could leave it
    // empty. The shard directories still tell.
    std::fs::write(data.join("shards"), "").unwrap();
    let refused = start(&data, 3).unwrap_err();
    assert!(refused.contains("holds data for 2 shards"), "{refused}");
    start(&data, 2).expect("the right count still starts");
    std::fs::write(data.join("shards"), "2x\n").unwrap();
    let refused = start(&data, 2).unwrap_err();
    assert!(refused.contains("not a shard count"), "{refused}");
}
