//! Scenario files for the shard's watch ring and subscriptions
//! (goldenscript-style): `server/tests/scenarios/watch/*.txt`.
//!
//! Each file is a script of commands; a command that prints is followed by
//! `----`, its output, and a blank line. Run with `UPDATE_SCENARIOS=1` to
//! rewrite the expected output after a deliberate change — then review the
//! diff like code.
//!
//! Commands (revisions are explicit, as the oracle would hand them out):
//! - `engine memory|rocksdb` — (re)starts with an empty store; every file
//!   runs once per engine unless it names one;
//! - `ring batches=N` — ring capacity (default 16);
//! - `put REV KEY VALUE`, `delete REV KEY [END]` — applies a write and
//!   appends its events to the ring;
//! - `compact REV`;
//! - `sub NAME KEY [END] start=REV current=REV [prev_kv] [window=N]`;
//! - `poll NAME resolved=REV` — polls until idle, acking every frame;
//! - `poll1 NAME resolved=REV` — one poll, no ack;
//! - `ack NAME SEQ`, `progress NAME REV`;
//! - `tick` — advances the clock by one heartbeat interval;
//! - `mode NAME` — prints the subscription's mode.
//!
//! `""` stands for the empty key and `\0` for the byte 0.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use metastore_proto::etcdserverpb::{DeleteRangeRequest, PutRequest};
use metastore_proto::mvccpb::Event;
use metastore_proto::scenario;
use metastore_server::engine::{open, Engine, EngineKind};
use metastore_server::mvcc::Mvcc;
use metastore_server::watch::{Poll, Subscription, WatchRing, RING_BYTES};

struct World {
    kind: EngineKind,
    _dir: tempfile::TempDir,
    engine: Rc<dyn Engine>,
    mvcc: Mvcc,
    ring: WatchRing,
    subs: HashMap<String, Subscription>,
    clock: Instant,
}

impl World {
    fn new(kind: EngineKind, batches: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(kind, dir.path()).unwrap();
        World {
            kind,
            mvcc: Mvcc::open(engine.clone()).unwrap(),
            engine,
            _dir: dir,
            ring: WatchRing::new(0, batches, RING_BYTES),
            subs: HashMap::new(),
            clock: Instant::now(),
        }
    }

    fn run(&mut self, line: &str) -> String {
        // `""` is the empty key, `\0` the byte 0 (etcd's "to the end").
        let words: Vec<&str> = line
            .split_whitespace()
            .map(|w| match w {
                "\"\"" => "",
                "\\0" => "\0",
                w => w,
            })
            .collect();
        let arg = |name: &str| -> Option<i64> {
            words
                .iter()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(|v| v.parse().unwrap())
        };
        let flag = |name: &str| words.contains(&name);
        match words[0] {
            "ring" => {
                *self = World::new(self.kind, arg("batches").unwrap() as usize);
                String::new()
            }
            "put" => {
                let rev: i64 = words[1].parse().unwrap();
                let mut w = self.mvcc.write(rev);
                w.put(&PutRequest {
                    key: words[2].as_bytes().to_vec().into(),
                    value: words[3].as_bytes().to_vec().into(),
                    ..Default::default()
                })
                .unwrap();
                let (batch, events) = w.finish_with_events();
                self.engine.write(batch, false).unwrap();
                self.ring.push(events);
                String::new()
            }
            "delete" => {
                let rev: i64 = words[1].parse().unwrap();
                let mut w = self.mvcc.write(rev);
                let d = w
                    .delete_range(
                        &DeleteRangeRequest {
                            key: words[2].into(),
                            range_end: words.get(3).copied().unwrap_or("").into(),
                            ..Default::default()
                        },
                        &|_: &[u8]| true,
                    )
                    .unwrap();
                let (batch, events) = w.finish_with_events();
                self.engine.write(batch, false).unwrap();
                self.ring.push(events);
                format!("deleted {}", d.deleted)
            }
            "compact" => {
                let rev: i64 = words[1].parse().unwrap();
                let batch = self.mvcc.compact(rev).unwrap_or_else(|e| {
                    panic!(
                        "compact {rev} at current {}: {e}",
                        self.mvcc.current_revision()
                    )
                });
                self.engine.write(batch, false).unwrap();
                String::new()
            }
            "sub" => {
                let end = words
                    .get(3)
                    .filter(|w| !w.contains('='))
                    .copied()
                    .unwrap_or("");
                let sub = Subscription::new(
                    words[2].into(),
                    end.into(),
                    arg("start").unwrap(),
                    flag("prev_kv"),
                    arg("window").unwrap_or(0) as u64,
                    arg("current").unwrap(),
                    &self.ring,
                );
                self.subs.insert(words[1].to_string(), sub);
                String::new()
            }
            "poll" | "poll1" => {
                let resolved = arg("resolved").unwrap();
                let once = words[0] == "poll1";
                let mut out = Vec::new();
                let sub = self.subs.get_mut(words[1]).unwrap();
                for _ in 0..1000 {
                    match sub.poll(&self.ring, &self.mvcc, resolved, self.clock) {
                        Poll::Idle => {
                            out.push("idle".to_string());
                            break;
                        }
                        Poll::Compacted(f) => {
                            out.push(format!("compacted at {}", f.compact_revision));
                            break;
                        }
                        // Polled again at once, as the shard does.
                        Poll::More => {}
                        Poll::Frame(f) => {
                            out.push(format!("frame seq={} resolved={}", f.seq, f.resolved));
                            for e in &f.events {
                                out.push(format!("  {}", show(e)));
                            }
                            if once {
                                break;
                            }
                            sub.ack(f.seq);
                        }
                    }
                }
                out.join("\n")
            }
            "ack" => {
                self.subs
                    .get_mut(words[1])
                    .unwrap()
                    .ack(words[2].parse().unwrap());
                String::new()
            }
            "progress" => {
                self.subs
                    .get_mut(words[1])
                    .unwrap()
                    .want_progress(words[2].parse().unwrap());
                String::new()
            }
            "tick" => {
                self.clock += metastore_server::watch::HEARTBEAT;
                String::new()
            }
            "mode" => format!("{:?}", self.subs[words[1]].mode()),
            other => panic!("unknown command {other:?}"),
        }
    }
}

fn show(e: &Event) -> String {
    let kv = e.kv.as_ref().unwrap();
    let kind = if e.r#type == 0 { "PUT" } else { "DELETE" };
    let mut s = format!(
        "{kind} {}@{} v{}",
        String::from_utf8_lossy(&kv.key),
        kv.mod_revision,
        kv.version
    );
    if kind == "PUT" {
        s.push_str(&format!(" ={}", String::from_utf8_lossy(&kv.value)));
    }
    if let Some(p) = &e.prev_kv {
        s.push_str(&format!(
            " prev={}@{}",
            String::from_utf8_lossy(&p.value),
            p.mod_revision
        ));
    }
    s
}

/// Runs one script on `kind`; returns it with the produced outputs.
fn run_script(kind: EngineKind, text: &str) -> String {
    let mut world = World::new(kind, 16);
    scenario::rewrite(text, |line| {
        if let Some(name) = line.strip_prefix("engine ") {
            world = World::new(name.parse().unwrap(), 16);
            String::new()
        } else {
            world.run(line)
        }
    })
}

#[test]
fn watch_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/watch");
    scenario::check_dir(&dir, |text| {
        [EngineKind::Memory, EngineKind::RocksDb]
            .into_iter()
            .map(|kind| (format!(" on {kind}"), run_script(kind, text)))
            .collect()
    });
}
