//! Idle polling: keeps the host's CPUs awake while requests are in flight
//! and for a short window after the last one, so that the next request
//! does not pay for waking a sleeping CPU.
//!
//! On a virtual machine an idle vCPU halts, and waking a halted vCPU (the
//! interrupt of an arriving packet, or one thread waking another) goes
//! through the hypervisor: tens of microseconds each time, several times
//! per request. Kernels can poll before halting (`cpuidle-haltpoll`'s
//! `guest_halt_poll_ns`), but many images switch that off. With
//! `idle_poll_us` set, a worker or router starts one spinner thread per
//! CPU at the `SCHED_IDLE` policy: the scheduler runs such a thread only on
//! a CPU that has nothing else to run and preempts it the moment anything
//! else wakes, so the CPU is awake, not halted, when work arrives. Spinners
//! spin only while a few requests are in flight (at most one per CPU) or
//! for `idle_poll_us` after the last one finished, then sleep until the
//! next request. With more requests in flight than CPUs the CPUs have work
//! anyway, and spinners in the gaps only took cycles from it (a
//! compute-bound model lost 8-30 % of its throughput at concurrency 64
//! before this rule).
//! The same idea as Seastar's idle polling.
//!
//! The cost is CPU time: while traffic flows the CPUs show as busy (to the
//! host, and to a container's CPU quota, which spinning uses up). Use it on
//! dedicated CPUs without a CFS quota, for latency-sensitive models at low
//! concurrency; it is off by default.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The spinners of one process and the activity they follow.
pub struct KeepAwake {
    shared: Arc<Shared>,
}

struct Shared {
    window_ns: u64,
    /// Spinners spin while at most this many requests are in flight.
    most_in_flight: usize,
    epoch: Instant,
    /// Requests between `KeepAwake::request` and the drop of their guard.
    in_flight: AtomicUsize,
    /// When the last request finished, in ns since `epoch`.
    last_done_ns: AtomicU64,
    /// Spinners currently spinning (not asleep).
    spinning: AtomicUsize,
    /// Set while at least one spinner sleeps: `KeepAwake::request` then
    /// wakes them.
    sleeping: AtomicBool,
    wake: Mutex<WakeState>,
    woken: Condvar,
}

struct WakeState {
    /// Bumped by every wake-up.
    generation: u64,
    /// Set when the `KeepAwake` is dropped: spinners exit.
    stopped: bool,
}

static PROCESS: OnceLock<KeepAwake> = OnceLock::new();

impl KeepAwake {
    /// Starts `threads` spinners that stay awake for `window` after the last
    /// request. A window of zero starts nothing.
    pub fn start(threads: usize, window: Duration) -> KeepAwake {
        let shared = Arc::new(Shared {
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            most_in_flight: threads.max(1),
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_done_ns: AtomicU64::new(0),
            spinning: AtomicUsize::new(0),
            sleeping: AtomicBool::new(false),
            wake: Mutex::new(WakeState {
                generation: 0,
                stopped: false,
            }),
            woken: Condvar::new(),
        });
        if !window.is_zero() {
            for index in 0..threads {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("idle-poll-{index}"))
                    .spawn(move || shared.spin());
                if let Err(error) = spawned {
                    tracing::warn!(%error, "cannot start an idle-poll thread");
                }
            }
        }
        KeepAwake { shared }
    }

    /// Starts the process's spinners, one per CPU, once; later calls keep
    /// the first setting. Their activity is the requests counted by
    /// [`KeepAwake::process_request`] (a worker's batchers) and by
    /// [`KeepAwake::request`] on the returned handle (a router, which
    /// counts only when it turned polling on itself). `None` when `window`
    /// is zero.
    pub fn start_for_process(window: Duration) -> Option<&'static KeepAwake> {
        if window.is_zero() {
            return None;
        }
        Some(PROCESS.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
            tracing::info!(
                threads = cpus,
                window_us = window.as_micros() as u64,
                "idle polling on"
            );
            KeepAwake::start(cpus, window)
        }))
    }

    /// Counts a request of the process as in flight until the guard drops;
    /// nothing when idle polling is off.
    pub fn process_request() -> Option<InFlight<'static>> {
        PROCESS.get().map(KeepAwake::request)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn request(&self) -> InFlight<'_> {
        let shared = &*self.shared;
        // SeqCst here and in `spin`: each side stores, then loads what the
        // other stored, and neither may miss both.
        let in_flight = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if in_flight <= shared.most_in_flight && shared.sleeping.load(Ordering::SeqCst) {
            shared.wake_all();
        }
        InFlight(shared)
    }

    /// Spinners spinning right now.
    pub fn spinning(&self) -> usize {
        self.shared.spinning.load(Ordering::Acquire)
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        // Spinners hold the shared state: tell them to go. (The
        // process-wide instance is never dropped.)
        self.shared.lock().stopped = true;
        self.shared.woken.notify_all();
    }
}

/// A request in flight; see [`KeepAwake::request`].
pub struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .last_done_ns
            .store(self.0.now_ns(), Ordering::Release);
        let left = self.0.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        // The load fell back to what spinners spin for.
        if left <= self.0.most_in_flight && self.0.sleeping.load(Ordering::SeqCst) {
            self.0.wake_all();
        }
    }
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether spinners should spin now.
    fn busy(&self) -> bool {
        match self.in_flight.load(Ordering::SeqCst) {
            0 => {
                self.now_ns()
                    .saturating_sub(self.last_done_ns.load(Ordering::Acquire))
                    < self.window_ns
            }
            in_flight => in_flight <= self.most_in_flight,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WakeState> {
        self.wake
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_all(&self) {
        let mut state = self.lock();
        state.generation = state.generation.wrapping_add(1);
        self.sleeping.store(false, Ordering::Release);
        self.woken.notify_all();
    }

    fn spin(&self) {
        lower_priority();
        loop {
            self.spinning.fetch_add(1, Ordering::AcqRel);
            while self.busy() {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
            }
            self.spinning.fetch_sub(1, Ordering::AcqRel);
            let mut state = self.lock();
            if state.stopped {
                return;
            }
            let seen = state.generation;
            // Announce the sleep before the last look, so that a request
            // entering in between either is seen here or wakes us.
            self.sleeping.store(true, Ordering::SeqCst);
            if self.busy() {
                continue;
            }
            while state.generation == seen && !state.stopped {
                state = self
                    .woken
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
    }
}

/// Puts the calling thread at the `SCHED_IDLE` policy: it runs only on a
/// CPU with nothing else to do.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration, and
    // pid 0 names the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if result != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "idle polling: cannot set SCHED_IDLE; spinners compete with the worker's threads"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn spinners_spin_while_requests_run_and_sleep_after_the_window() {
        let keep = KeepAwake::start(2, Duration::from_millis(50));
        // Nothing has happened for longer than the window once it passes:
        // both spinners go to sleep.
        wait_for("spinners asleep at start", || keep.spinning() == 0);
        let request = keep.request();
        wait_for("both spinners awake", || keep.spinning() == 2);
        // A request in flight keeps them awake however long it takes.
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(keep.spinning(), 2, "awake while the request runs");
        drop(request);
        let finished = Instant::now();
        wait_for("spinners asleep after the window", || keep.spinning() == 0);
        assert!(
            finished.elapsed() >= Duration::from_millis(50),
            "they stayed awake for the window"
        );
        // And wake again for the next request.
        let again = keep.request();
        wait_for("awake again", || keep.spinning() == 2);
        // More requests in flight than spinners (CPUs): the CPUs have work,
        // and the spinners sleep.
        let more: Vec<_> = (0..2).map(|_| keep.request()).collect();
        wait_for("asleep under load", || keep.spinning() == 0);
        drop(more);
        wait_for("awake once the load falls", || keep.spinning() == 2);
        drop(again);
    }

    #[test]
    fn a_zero_window_starts_no_spinner() {
        let keep = KeepAwake::start(2, Duration::ZERO);
        let _request = keep.request();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(keep.spinning(), 0);
    }
}
