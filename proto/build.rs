//! Generates prost message types for every `.proto` file under `protos/`.
//!
//! The directory is walked (one level of package directories, plus any files
//! directly in it) so new protocol files, such as `protos/shardpb/shard.proto`,
//! are picked up without touching this script. Only messages are generated
//! here; the gateway generates its tonic service code itself and refers back
//! to these types via `extern_path`.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect_protos(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("protos");
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-env-changed=PROTOC");

    let mut protos = Vec::new();
    collect_protos(&root, &mut protos);
    assert!(
        !protos.is_empty(),
        "no .proto files under {}",
        root.display()
    );

    prost_build::Config::new()
        // Keys and values of `KeyValue` are `bytes::Bytes`: the gateway
        // decodes shard frames without copying them and shares one event
        // among all the watchers it fans out to. So are `PutRequest`'s:
        // the gateway decodes a put from the call's buffer without
        // copying and clones it per attempt for free, and the shard's
        // apply keeps the decoded key and value instead of copying them.
        .bytes([".mvccpb.KeyValue", ".etcdserverpb.PutRequest"])
        .compile_protos(&protos, &[&root])
        .expect("compiling protobuf definitions");
}
