//! Scenario files for the gateway's watermark merge (goldenscript-style):
//! `gateway/tests/scenarios/merge/*.txt`. No I/O: frames from shards go in,
//! ordered whole-revision releases and driver actions come out.
//!
//! Each file is a script; a command that prints is followed by `----`, its
//! output and a blank line. `UPDATE_SCENARIOS=1` rewrites the expected
//! output (review the diff like code).
//!
//! Commands:
//! - `merge shards=N start=REV [window=W] [budget=BYTES] [silence=TICKS]
//!   [history=H]` — a merge of the range [a, b) over shards 0..N whose
//!   revisions come from history H; prints its first actions;
//! - `subscribed LANE GEN`, `lost LANE GEN` — the driver reports a
//!   subscription's outcome;
//! - `frame LANE GEN seq=S resolved=R [REV:KEY ...]` — a shard's frame
//!   (`REV:KEY` puts; `REV:-KEY` deletes);
//! - `compacted LANE GEN seq=S at=REV [history=H]` — a shard's compaction
//!   frame (with `history`: a refusal for a changed history);
//! - `progress REV` — a client wants progress through REV;
//! - `release` — every release available now;
//! - `actions` — what the driver must do now;
//! - `tick` — time passes (one silence tick);
//! - `state` — released revision, buffered bytes, end.

use std::path::Path;

use metastore_gateway::watch::merge::{event_revision, Action, Merge, MergeConfig};
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use metastore_proto::scenario;
use metastore_proto::shardpb::WatchEventsResponse;

fn event(spec: &str) -> Event {
    let (rev, key) = spec.split_once(':').expect("REV:KEY");
    let rev: i64 = rev.parse().unwrap();
    let (kind, key) = match key.strip_prefix('-') {
        Some(k) => (EventType::Delete, k),
        None => (EventType::Put, key),
    };
    Event {
        r#type: kind as i32,
        kv: Some(KeyValue {
            key: key.as_bytes().to_vec().into(),
            mod_revision: rev,
            create_revision: rev,
            version: 1,
            ..Default::default()
        }),
        prev_kv: None,
    }
}

fn show_actions(actions: Vec<Action>) -> String {
    if actions.is_empty() {
        return "no actions".into();
    }
    actions
        .into_iter()
        .map(|a| match a {
            Action::Subscribe {
                lane,
                shard,
                gen,
                request,
            } => {
                let mut s = format!(
                    "subscribe lane={lane} shard={shard} gen={gen} from={}",
                    request.start_revision
                );
                if request.expect_history != 0 {
                    s += &format!(" history={}", request.expect_history);
                }
                s
            }
            Action::Ack { lane, gen, seq } => format!("ack lane={lane} gen={gen} seq={seq}"),
            Action::Progress {
                lane,
                gen,
                revision,
            } => format!("progress lane={lane} gen={gen} through={revision}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn run(merge: &mut Option<Merge>, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let arg = |name: &str| -> Option<i64> {
        words
            .iter()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .map(|v| v.parse().unwrap())
    };
    let pos = |i: usize| -> i64 { words[i].parse().unwrap() };
    if words[0] == "merge" {
        let shards: Vec<u32> = (0..arg("shards").unwrap() as u32).collect();
        let mut cfg = MergeConfig::default();
        if let Some(w) = arg("window") {
            cfg.window = w as u32;
        }
        if let Some(t) = arg("silence") {
            cfg.silence_ticks = t as u32;
        }
        if let Some(b) = arg("budget") {
            cfg.buffer_budget = b as usize;
        }
        let mut m = Merge::new(
            b"a".to_vec(),
            b"b".to_vec(),
            arg("start").unwrap(),
            &shards,
            arg("history").unwrap_or(0) as u64,
            cfg,
        );
        let out = show_actions(m.actions());
        *merge = Some(m);
        return out;
    }
    let m = merge.as_mut().expect("no merge yet");
    match words[0] {
        "subscribed" => format!("{}", m.subscribed(pos(1) as usize, pos(2) as u64)),
        "lost" => {
            m.lost(pos(1) as usize, pos(2) as u64);
            String::new()
        }
        "frame" | "compacted" => {
            let events = words[3..]
                .iter()
                .filter(|w| !w.contains('='))
                .map(|w| event(w))
                .collect();
            m.frame(
                pos(1) as usize,
                pos(2) as u64,
                WatchEventsResponse {
                    seq: arg("seq").unwrap() as u64,
                    events,
                    resolved: arg("resolved").unwrap_or(0),
                    compact_revision: arg("at").unwrap_or(0),
                    history: arg("history").unwrap_or(0) as u64,
                },
            );
            String::new()
        }
        "progress" => {
            m.want_progress(pos(1));
            String::new()
        }
        "release" => {
            let mut out = Vec::new();
            while let Some(r) = m.release() {
                let evs: Vec<String> = r
                    .events
                    .iter()
                    .map(|e| {
                        let kv = e.kv.as_ref().unwrap();
                        let del = if e.r#type == EventType::Delete as i32 {
                            "-"
                        } else {
                            ""
                        };
                        format!(
                            "{}:{del}{}",
                            event_revision(e),
                            String::from_utf8_lossy(&kv.key)
                        )
                    })
                    .collect();
                out.push(format!(
                    "release {}..={} [{}]",
                    r.from,
                    r.through,
                    evs.join(" ")
                ));
            }
            if out.is_empty() {
                "nothing to release".into()
            } else {
                out.join("\n")
            }
        }
        "actions" => show_actions(m.actions()),
        "tick" => {
            m.tick();
            String::new()
        }
        "state" => format!(
            "released={} buffered={} end={:?}",
            m.released(),
            m.buffered(),
            m.end()
        ),
        other => panic!("unknown command {other:?}"),
    }
}

fn run_script(text: &str) -> String {
    let mut merge = None;
    scenario::rewrite(text, |line| run(&mut merge, line))
}

#[test]
fn merge_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/merge");
    scenario::check_dir(&dir, |text| vec![(String::new(), run_script(text))]);
}
