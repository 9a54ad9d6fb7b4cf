//! The bench client's threads: one single-threaded tokio runtime per core,
//! each owning some of the connections and every client that uses them.
//!
//! On this 2-core machine the client shares the cores with the server it
//! measures, so what the client spends per request is taken from the
//! server. On tokio's multi-threaded runtime a request crossed threads on
//! its way: the client task that sent it and the HTTP/2 connection task
//! that carried it ran on whichever worker was free, so each request and
//! each answer was a wake of a task that might sit on the other thread
//! (a lock, an atomic hand-over, often a futex wake), and the runtime's
//! shared task lists were touched from both threads.
//!
//! Here connection `i` of a pool (see `connect_pool`) is opened on thread
//! `i % n`, so its connection task is spawned there, and a workload that
//! drives clients spawns client `c`, which uses connection `c % conns`, on
//! that same thread ([`spawn`]). A request then goes from its client to
//! its connection and back within one thread; the threads share only the
//! pacer's counter and the latency recorder. This took about a fifth off
//! the client's CPU per put and per range (bench/results/TUNING.md, "The
//! bench client: a thread per core").
//!
//! Invariant: the threads live until the process exits; a handle taken
//! from [`for_connection`] is always one of a running runtime. Before
//! [`start`] (unit tests, code outside the client), [`for_connection`]
//! answers the current runtime, which is where everything ran before.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle};
use tokio::task::JoinSet;

static THREADS: OnceLock<Vec<Handle>> = OnceLock::new();

/// Starts `n` client threads (0 = one per core). Only the first call in a
/// process starts any.
pub fn start(n: usize) {
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    };
    THREADS.get_or_init(|| (0..n).map(spawn_thread).collect());
}

fn spawn_thread(i: usize) -> Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("bench-client-{i}"))
        .spawn(move || {
            let rt = Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client thread runtime");
            tx.send(rt.handle().clone()).expect("client thread handle");
            // Runs whatever is spawned on this runtime until the process
            // exits.
            rt.block_on(std::future::pending::<()>());
        })
        .expect("client thread");
    rx.recv().expect("client thread started")
}

/// The runtime of connection `i` of a pool, and of the clients using it.
pub fn for_connection(i: usize) -> Handle {
    match THREADS.get() {
        Some(handles) => handles[i % handles.len()].clone(),
        None => Handle::current(),
    }
}

/// Spawns `task` into `set` on the thread of connection `conn`: a task that
/// sends on a connection runs beside it.
pub fn spawn<T: Send + 'static>(
    set: &mut JoinSet<T>,
    conn: usize,
    task: impl Future<Output = T> + Send + 'static,
) {
    set.spawn_on(task, &for_connection(conn));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connections_tasks_run_on_its_thread() {
        start(2);
        let mut set = JoinSet::new();
        for conn in 0..4 {
            spawn(&mut set, conn, async move {
                (conn, std::thread::current().name().map(str::to_owned))
            });
        }
        let mut seen = Vec::new();
        while let Some(r) = set.join_next().await {
            seen.push(r.unwrap());
        }
        seen.sort();
        let names: Vec<_> = seen.iter().map(|(_, n)| n.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "bench-client-0",
                "bench-client-1",
                "bench-client-0",
                "bench-client-1"
            ]
        );
    }
}
