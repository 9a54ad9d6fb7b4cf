//! `Signal`: a wake-up flag between tasks of one executor.
//!
//! The shard's hot paths need "something is ready, wake the one task that
//! handles it" many times per request: a proposal was queued (the raft
//! task), a response was encoded (a connection's writer). A channel does
//! that with an allocation per message and a queue nobody reads; a
//! `Signal` is a flag and at most one stored waker.
//!
//! Invariants: one task waits at a time (a second `wait` replaces the first
//! waiter's waker, which is a bug in the caller, not a lost signal for the
//! newest waiter); `notify` before `wait` is not lost (the flag stays set
//! until a `wait` consumes it); any number of `notify` calls before a
//! `wait` collapse into one wake-up. Not `Send`: a shard's tasks share one
//! thread.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// See the module essay.
#[derive(Default)]
pub struct Signal {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Signal {
    /// Sets the flag and wakes the waiting task, if any.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Clears the flag; true if it was set.
    pub fn take(&self) -> bool {
        self.set.replace(false)
    }

    /// Waits until the flag is set, then clears it.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.take() {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn a_notify_before_the_wait_is_kept_and_many_collapse_into_one() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let s = Signal::default();
                s.notify();
                s.notify();
                s.wait().await;
                assert!(!s.take(), "two notifies are one wake-up");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_waiting_task_is_woken_by_another() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let s = Rc::new(Signal::default());
                let woken = Rc::new(Cell::new(false));
                let waiter = glommio::spawn_local({
                    let (s, woken) = (s.clone(), woken.clone());
                    async move {
                        s.wait().await;
                        woken.set(true);
                    }
                });
                // Let the waiter run until it waits.
                glommio::executor().yield_now().await;
                assert!(!woken.get(), "nothing was signalled yet");
                s.notify();
                waiter.await;
                assert!(woken.get());
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
