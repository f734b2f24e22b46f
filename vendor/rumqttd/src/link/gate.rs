//! PATCH(gateway): futures polled only after they woke (PATCHES.md, 38).
//!
//! A connection's task waits on several things at once (its socket, the router's signal,
//! the application's acks, its downlink, the keep alive) and is woken for one of them at
//! a time: at 1000 devices, twice for every reading (the publish read, then its PUBACK
//! released). `select!` polls every branch on every turn, and a pending socket read,
//! flume receive, `Notified` or `Sleep` takes a lock or registers its waker again each
//! time. Behind a gate such a future is polled on the first turn after it is set, changed
//! or completed, and afterwards only once it woke its gate: what `FuturesUnordered` does
//! for its futures.
//!
//! The gates of one task share one [`Gates`]: a word of flags, one per gate, and the
//! task's waker. A future behind a gate is polled with the gate's own waker, which sets
//! the gate's flag and then wakes the task. A closed gate costs its task a comparison of
//! its waker with the one kept (a task's waker rarely changes) and the load of a flag,
//! where a pending future's poll took a lock or two atomic updates.

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, RawWakerVTable, Wake, Waker};

/// What the gates of one task share.
pub(crate) struct Gates {
    /// One flag per gate: set when its future may have progressed.
    fired: AtomicU32,
    /// The flags handed out so far.
    taken: AtomicU32,
    /// The task's waker, which the gates' wakers wake.
    task: Mutex<Option<Waker>>,
    /// Which waker `task` holds, for the task to compare its own with, without the lock.
    /// Written only by the task, under the lock, with `task`.
    task_data: AtomicPtr<()>,
    task_vtable: AtomicPtr<RawWakerVTable>,
}

impl Gates {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Gates {
            fired: AtomicU32::new(0),
            taken: AtomicU32::new(0),
            task: Mutex::new(None),
            task_data: AtomicPtr::new(std::ptr::null_mut()),
            task_vtable: AtomicPtr::new(std::ptr::null_mut()),
        })
    }

    /// Keeps `waker` as the task's, unless it is the one kept.
    fn register(&self, waker: &Waker) {
        let data = waker.data().cast_mut();
        let vtable = std::ptr::from_ref(waker.vtable()).cast_mut();
        if self.task_data.load(Ordering::Relaxed) == data
            && self.task_vtable.load(Ordering::Relaxed) == vtable
        {
            return;
        }
        let mut task = self.task.lock();
        *task = Some(waker.clone());
        self.task_data.store(data, Ordering::Relaxed);
        self.task_vtable.store(vtable, Ordering::Relaxed);
    }

    fn wake_task(&self) {
        if let Some(task) = &*self.task.lock() {
            task.wake_by_ref();
        }
    }

    /// A gate of its own for a future made anew on each turn ([`Entry::wrap`]).
    ///
    /// # Panics
    ///
    /// Past 32 gates for one task.
    pub(crate) fn entry(self: &Arc<Self>) -> Entry {
        let taken = self.taken.fetch_add(1, Ordering::Relaxed);
        assert!(taken < u32::BITS, "at most {} gates per task", u32::BITS);
        let bit = 1 << taken;
        let waker = Waker::from(Arc::new(GateWaker {
            gates: self.clone(),
            bit,
        }));
        let entry = Entry {
            gates: self.clone(),
            bit,
            waker,
        };
        entry.open();
        entry
    }

    /// `future` behind a gate of its own.
    pub(crate) fn gate<F>(self: &Arc<Self>, future: F) -> Gate<F> {
        Gate {
            entry: self.entry(),
            future,
        }
    }
}

struct GateWaker {
    gates: Arc<Gates>,
    bit: u32,
}

impl Wake for GateWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.gates.fired.fetch_or(self.bit, Ordering::Release);
        self.gates.wake_task();
    }
}

/// One gate: its flag among its task's [`Gates`], and the waker that sets it.
pub(crate) struct Entry {
    gates: Arc<Gates>,
    bit: u32,
    waker: Waker,
}

impl Entry {
    /// The future is polled on the next turn, woken or not.
    pub(crate) fn open(&self) {
        self.gates.fired.fetch_or(self.bit, Ordering::Release);
    }

    /// `future`, made for this turn, behind this gate: polled only if the gate is open.
    /// A future that completes leaves the gate open for the next one (it may find what
    /// the last one left, such as a second packet already read).
    pub(crate) fn wrap<F: Future>(&self, future: F) -> Gated<'_, F> {
        Gated {
            entry: self,
            future,
        }
    }

    fn poll<F: Future>(&self, future: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake after the read wakes this task.
        self.gates.register(cx.waker());
        if self.gates.fired.load(Ordering::Acquire) & self.bit == 0 {
            return Poll::Pending;
        }
        // Cleared before the future is polled: a wake during the poll is not lost.
        self.gates.fired.fetch_and(!self.bit, Ordering::AcqRel);
        future.poll(&mut Context::from_waker(&self.waker))
    }
}

/// A future kept across turns behind a gate: polled when it is new, changed through
/// [`Gate::change`], or woken.
pub(crate) struct Gate<F> {
    entry: Entry,
    future: F,
}

impl<F> Gate<F> {
    /// The future, to replace it or change it in place (a timer's deadline); it is
    /// polled on the next turn.
    pub(crate) fn change(&mut self) -> &mut F {
        self.entry.open();
        &mut self.future
    }
}

impl<F: Future + Unpin> Future for Gate<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.entry.poll(Pin::new(&mut this.future), cx)
    }
}

pin_project! {
    /// A future made for one turn behind its [`Entry`] (see [`Entry::wrap`]).
    pub(crate) struct Gated<'a, F> {
        entry: &'a Entry,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Gated<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = this.entry.poll(this.future, cx);
        if polled.is_ready() {
            this.entry.open();
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::Gates;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Wake, Waker};

    /// Pending until `ready`; counts its polls and keeps the waker of the last one.
    #[derive(Default)]
    struct Probe {
        polls: usize,
        ready: bool,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[derive(Default)]
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<CountWakes>, Waker) {
        let task = Arc::new(CountWakes::default());
        let waker = Waker::from(task.clone());
        (task, waker)
    }

    #[test]
    fn a_kept_future_is_polled_when_new_changed_or_woken_and_not_otherwise() {
        let (task, task_waker) = task();
        let mut cx = Context::from_waker(&task_waker);
        let gates = Gates::new();
        let mut gate = gates.gate(Probe::default());
        let mut other = gates.gate(Probe::default());
        let inner_waker = gate.future.waker.clone();

        // New: polled once; then not again while nothing wakes it.
        for _ in 0..3 {
            assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
            assert!(Pin::new(&mut other).poll(&mut cx).is_pending());
        }
        assert_eq!((gate.future.polls, other.future.polls), (1, 1));

        // Woken: the task is woken, and only that future polled once more.
        let waker = inner_waker.lock().unwrap().take().expect("polled with a waker");
        waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        for _ in 0..2 {
            assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
            assert!(Pin::new(&mut other).poll(&mut cx).is_pending());
        }
        assert_eq!((gate.future.polls, other.future.polls), (2, 1));

        // Changed: polled on the next turn, and its result passed on.
        gate.change().ready = true;
        assert!(Pin::new(&mut gate).poll(&mut cx).is_ready());
        assert_eq!(gate.future.polls, 3);

        // A wake that comes while the future is polled is not lost.
        let mut gate = gates.gate(WakesWhilePolled(0));
        assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        assert_eq!(gate.future.0, 2);
    }

    #[test]
    fn a_future_made_each_turn_is_polled_when_woken_and_after_one_completed() {
        let (_task, task_waker) = task();
        let mut cx = Context::from_waker(&task_waker);
        let gates = Gates::new();
        let entry = gates.entry();
        let waker = Arc::new(Mutex::new(None));
        let mut turn = |ready: bool| {
            let probe = Probe {
                ready,
                waker: waker.clone(),
                ..Probe::default()
            };
            let mut gated = std::pin::pin!(entry.wrap(probe));
            let polled = gated.as_mut().poll(&mut cx);
            (polled.is_ready(), gated.future.polls)
        };

        // Open at first; closed after a pending poll until its waker fires.
        assert_eq!(turn(false), (false, 1));
        assert_eq!(turn(true), (false, 0));
        waker.lock().unwrap().take().expect("polled").wake();
        // Completed: the next turn's future is polled without a wake.
        assert_eq!(turn(true), (true, 1));
        assert_eq!(turn(false), (false, 1));
        assert_eq!(turn(true), (false, 0));
    }

    /// Wakes its own waker from inside its first poll, as a future out of its
    /// cooperative budget does.
    struct WakesWhilePolled(usize);

    impl Future for WakesWhilePolled {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0 += 1;
            if self.0 == 1 {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }
}
