//! Generates the tonic gRPC service code (server and client) for the etcd v3
//! API from `proto/protos/etcdserverpb/rpc.proto`.
//!
//! Messages are not generated here: `extern_path` maps every etcd proto
//! package to the types `metastore_proto` already generated, so the services
//! speak exactly the same Rust types the rest of the workspace uses. The
//! output is `$OUT_DIR/etcdserverpb.rs`, holding only the `*_server` and
//! `*_client` modules (`kv_server::{Kv, KvServer}`, `watch_server`, ...).
//!
//! One message is the gateway's own: `WatchResponse` is sent as
//! `watch::wire::OutgoingWatchResponse`, the same message on the wire with
//! its events encoded once per release for every watcher (see that module).

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let includes = manifest_dir.join("../proto/protos");
    let rpc = includes.join("etcdserverpb/rpc.proto");
    // rpc.proto imports these; a change there can change the services' types.
    println!(
        "cargo:rerun-if-changed={}",
        includes.join("mvccpb").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        includes.join("authpb").display()
    );
    println!("cargo:rerun-if-env-changed=PROTOC");

    tonic_prost_build::configure()
        // prost with small starting buffers (see `src/codec.rs`).
        .codec_path("crate::codec::EtcdCodec")
        .build_server(true)
        .build_client(true)
        // The most specific path wins (prost-build looks up the exact name
        // first), so only this message leaves the package mapping below.
        .extern_path(
            ".etcdserverpb.WatchResponse",
            "crate::watch::wire::OutgoingWatchResponse",
        )
        .extern_path(".etcdserverpb", "::metastore_proto::etcdserverpb")
        .extern_path(".mvccpb", "::metastore_proto::mvccpb")
        .extern_path(".authpb", "::metastore_proto::authpb")
        .compile_protos(&[rpc], &[includes])
        .expect("generating etcd gRPC services");
}
