//! Links the libraries Debian's static `librocksdb.a` was built against.
//!
//! `.cargo/config.toml` links RocksDB statically (`ROCKSDB_STATIC`): in a
//! shared library every access to RocksDB's thread-locals (its perf
//! context, touched on each read and write) goes through
//! `__tls_get_addr`, which showed up as ~6% of the shard server's CPU
//! under a write load. Linked into the executable, those accesses become
//! plain offsets. The archive does not carry its own dependencies, so they
//! are named here (all come with `librocksdb-dev`).

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    if std::env::var_os("ROCKSDB_STATIC").is_some() {
        for lib in ["gflags", "z", "bz2", "lz4", "zstd"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
}
