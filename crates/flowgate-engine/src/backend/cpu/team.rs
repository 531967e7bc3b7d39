//! [`Team`]: a small team of worker threads that stay awake (spinning) between jobs, for CPU
//! work that recurs every few hundred microseconds and must start at once: the experts a GPU
//! layer hands to the CPU (`--cpu-experts`). A rayon pool puts its threads to sleep between
//! such jobs and wakes them one by one, which measured about twice the job's own time on the
//! H100 box; here the workers spin on a generation counter for a while after each job
//! ([`Team::new`]'s `spin`), then park on a condition variable until the next one.
//!
//! A job ([`TeamJob`]) is a sequence of phases, each a number of independent chunks the
//! workers claim one at a time (one atomic counter, so uneven chunks balance). When the last
//! chunk of a phase completes, the worker that completed it runs [`TeamJob::between`] (e.g.
//! quantising an intermediate vector) and opens the next phase; after the last phase it runs
//! [`TeamJob::finish`]. [`Team::submit`] returns at once: the submitting thread goes on with
//! other work (queueing GPU launches) while the team computes.
//!
//! A chunk that panics is caught, reported to [`TeamJob::failed`], and counted as done, so a
//! job always finishes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Work for a [`Team`]: phases of independent chunks.
pub trait TeamJob: Send + Sync {
    /// Number of phases (at least 1).
    fn phases(&self) -> usize;
    /// Chunks of `phase` (0 is allowed: the phase is skipped).
    fn chunks(&self, phase: usize) -> usize;
    /// Runs chunk `chunk` of `phase`; chunks of one phase run concurrently, phases in order.
    fn run(&self, phase: usize, chunk: usize);
    /// Runs once after the last chunk of `phase` (not after the last phase), before any chunk
    /// of the next phase.
    fn between(&self, _phase: usize) {}
    /// Runs once, after the last chunk of the last phase.
    fn finish(&self);
    /// A chunk panicked (the job still runs to its end and finishes).
    fn failed(&self, msg: String);
}

/// `T` alone on its cache lines (two, for the adjacent-line prefetcher): the counters every
/// worker updates per chunk must not share a line with what the others only read.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// One submitted job and its progress.
struct Run {
    job: Arc<dyn TeamJob>,
    /// `phase << 32 | next chunk to claim`.
    claim: Line<AtomicU64>,
    /// Chunks of the current phase completed.
    done: Line<AtomicUsize>,
    finished: Line<AtomicBool>,
}

const CHUNK_BITS: u32 = 32;
const CHUNK_MASK: u64 = (1 << CHUNK_BITS) - 1;

impl Run {
    /// The first phase at or after `p` with chunks; `None` past the last.
    fn next_phase(&self, mut p: usize) -> Option<usize> {
        let n = self.job.phases();
        while p < n {
            if self.job.chunks(p) > 0 {
                return Some(p);
            }
            if p + 1 < n {
                self.job.between(p);
            }
            p += 1;
        }
        None
    }

    /// Opens phase `p` (or finishes the job when there is none left).
    fn open(&self, p: usize) {
        match self.next_phase(p) {
            Some(p) => {
                self.done.store(0, Ordering::Release);
                self.claim
                    .store((p as u64) << CHUNK_BITS, Ordering::Release);
            }
            None => {
                self.job.finish();
                self.finished.store(true, Ordering::Release);
            }
        }
    }

    /// Claims and runs chunks until the job is finished or nothing is left to claim in the
    /// last phase.
    fn work(&self) {
        while !self.finished.load(Ordering::Acquire) {
            let c = self.claim.fetch_add(1, Ordering::AcqRel);
            let (p, i) = ((c >> CHUNK_BITS) as usize, (c & CHUNK_MASK) as usize);
            let n = self.job.chunks(p);
            if i >= n {
                // This phase is all claimed: wait for its last chunk (another worker's), then
                // claim from the next phase, or stop when the job is done.
                while !self.finished.load(Ordering::Acquire)
                    && (self.claim.load(Ordering::Acquire) >> CHUNK_BITS) as usize == p
                {
                    std::hint::spin_loop();
                }
                continue;
            }
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| self.job.run(p, i))) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a CPU worker panicked".into());
                self.job.failed(msg);
            }
            if self.done.fetch_add(1, Ordering::AcqRel) + 1 == n {
                // Every chunk of phase p is claimed and done: this worker moves the job on.
                if p + 1 < self.job.phases() {
                    self.job.between(p);
                }
                self.open(p + 1);
            }
        }
    }
}

struct Inner {
    /// Bumped on every submission.
    seq: AtomicU64,
    run: Mutex<Option<Arc<Run>>>,
    /// Workers parked on `wake` (guarded by the mutex).
    parked: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
    spin: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Worker threads that take [`TeamJob`]s; dropped, they stop and are joined.
pub struct Team {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl Team {
    /// `threads` workers (at least 1) that spin for `spin` after each job before parking.
    pub fn new(threads: usize, spin: Duration) -> std::io::Result<Team> {
        let inner = Arc::new(Inner {
            seq: AtomicU64::new(0),
            run: Mutex::new(None),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            spin,
        });
        let mut workers = Vec::new();
        for w in 0..threads.max(1) {
            let shared = inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("flowgate-team-{w}"))
                .spawn(move || worker(&shared));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let team = Team { inner, workers };
                    drop(team);
                    return Err(e);
                }
            }
        }
        Ok(Team { inner, workers })
    }

    /// Workers: the machine's cores less four, but at least half of them (and at least 1);
    /// `FLOWGATE_CPU_EXPERT_THREADS` overrides. The cores left over serve the thread that
    /// queues GPU work (it spins while it synchronises), the driver's threads and the system:
    /// on the 16-core H100 box 12 workers decoded moe30b at 3 GiB faster than 14 or 15
    /// (50.5, 48.0 and 45.4 tok/s, docs/benchmarks.md).
    pub fn default_threads() -> usize {
        if let Some(n) = std::env::var("FLOWGATE_CPU_EXPERT_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            return n;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(4).max(cores / 2).max(1)
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Starts `job` and returns at once; the job's [`TeamJob::finish`] says when it is done.
    /// A job submitted while another runs replaces it for workers not yet on the first; the
    /// first still completes (its workers finish it).
    pub fn submit(&self, job: Arc<dyn TeamJob>) {
        let run = Arc::new(Run {
            job,
            claim: Line(AtomicU64::new(0)),
            done: Line(AtomicUsize::new(0)),
            finished: Line(AtomicBool::new(false)),
        });
        // Empty leading phases are skipped here (and an empty job finishes here).
        match run.next_phase(0) {
            Some(p) => run.claim.store((p as u64) << CHUNK_BITS, Ordering::Release),
            None => {
                run.job.finish();
                return;
            }
        }
        *lock(&self.inner.run) = Some(run);
        self.inner.seq.fetch_add(1, Ordering::AcqRel);
        let parked = lock(&self.inner.parked);
        if *parked > 0 {
            self.inner.wake.notify_all();
        }
    }
}

fn worker(inner: &Inner) {
    let mut seen = 0u64;
    loop {
        // Wait for a new submission: spin a while, then park.
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            if inner.stop.load(Ordering::Acquire) {
                return;
            }
            let s = inner.seq.load(Ordering::Acquire);
            if s != seen {
                seen = s;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && t0.elapsed() >= inner.spin {
                let mut parked = lock(&inner.parked);
                *parked += 1;
                while inner.seq.load(Ordering::Acquire) == seen
                    && !inner.stop.load(Ordering::Acquire)
                {
                    parked = inner.wake.wait(parked).unwrap_or_else(|p| p.into_inner());
                }
                *parked -= 1;
                continue;
            }
            std::hint::spin_loop();
        }
        let run = lock(&inner.run).clone();
        if let Some(run) = run {
            run.work();
            // A finished job leaves the team, so that what it holds (its completion's
            // captures) is released once its last worker lets go of it.
            if run.finished.load(Ordering::Acquire) {
                let mut cur = lock(&inner.run);
                if cur.as_ref().is_some_and(|r| Arc::ptr_eq(r, &run)) {
                    *cur = None;
                }
            }
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        {
            let _parked = lock(&self.inner.parked);
            self.inner.wake.notify_all();
        }
        // The last reference may go on a worker (a job's completion can hold what owns the
        // team): that worker cannot join itself; it is let go and leaves its loop on `stop`.
        let me = std::thread::current().id();
        for h in self.workers.drain(..) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Phase 0 writes `i` into slot i; phase 1 (after `between` sums them) adds the sum.
    struct Sum {
        slots: Vec<AtomicU32>,
        sum: AtomicU32,
        phase1: usize,
        result: Mutex<Option<Vec<u32>>>,
        cv: Condvar,
        fail_at: Option<usize>,
        failures: AtomicUsize,
    }

    impl Sum {
        fn new(n: usize, phase1: usize, fail_at: Option<usize>) -> Arc<Sum> {
            Arc::new(Sum {
                slots: (0..n).map(|_| AtomicU32::new(0)).collect(),
                sum: AtomicU32::new(0),
                phase1,
                result: Mutex::new(None),
                cv: Condvar::new(),
                fail_at,
                failures: AtomicUsize::new(0),
            })
        }

        fn wait(&self) -> Vec<u32> {
            let mut g = lock(&self.result);
            loop {
                if let Some(r) = g.take() {
                    return r;
                }
                g = self.cv.wait(g).unwrap();
            }
        }
    }

    impl TeamJob for Sum {
        fn phases(&self) -> usize {
            3
        }
        fn chunks(&self, phase: usize) -> usize {
            match phase {
                0 => self.slots.len(),
                1 => 0,
                _ => self.phase1,
            }
        }
        fn run(&self, phase: usize, chunk: usize) {
            if phase == 0 {
                if Some(chunk) == self.fail_at {
                    panic!("chunk {chunk} fails");
                }
                self.slots[chunk].store(chunk as u32 + 1, Ordering::Relaxed);
            } else {
                let s = self.sum.load(Ordering::Relaxed);
                self.slots[chunk].fetch_add(s, Ordering::Relaxed);
            }
        }
        fn between(&self, phase: usize) {
            if phase == 0 {
                let s = self.slots.iter().map(|v| v.load(Ordering::Relaxed)).sum();
                self.sum.store(s, Ordering::Relaxed);
            }
        }
        fn finish(&self) {
            let r = self
                .slots
                .iter()
                .map(|v| v.load(Ordering::Relaxed))
                .collect();
            *lock(&self.result) = Some(r);
            self.cv.notify_all();
        }
        fn failed(&self, _msg: String) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn expect(n: usize, phase1: usize, fail_at: Option<usize>) -> Vec<u32> {
        let vals: Vec<u32> = (0..n)
            .map(|i| if Some(i) == fail_at { 0 } else { i as u32 + 1 })
            .collect();
        let s: u32 = vals.iter().sum();
        vals.iter()
            .enumerate()
            .map(|(i, &v)| if i < phase1 { v + s } else { v })
            .collect()
    }

    #[test]
    fn phases_run_in_order_with_between_once() {
        for threads in [1, 2, 5] {
            // Spinning briefly and parking both get exercised (jobs follow one another at
            // once, then after a pause longer than the spin).
            let team = Team::new(threads, Duration::from_millis(2)).unwrap();
            for round in 0..50 {
                let n = 1 + (round * 7) % 40;
                let p1 = (round * 3) % (n + 1);
                let job = Sum::new(n, p1, None);
                team.submit(job.clone());
                assert_eq!(
                    job.wait(),
                    expect(n, p1, None),
                    "threads {threads} round {round}"
                );
                if round % 10 == 9 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    #[test]
    fn a_finished_job_is_let_go() {
        // The team keeps no reference to a job once it is done (its captures, e.g. the
        // pager a completion holds, must not live on until the next submission).
        let team = Team::new(4, Duration::from_millis(50)).unwrap();
        let job = Sum::new(64, 8, None);
        team.submit(job.clone());
        job.wait();
        let t0 = Instant::now();
        while Arc::strong_count(&job) > 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the team still holds the job"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_team_dropped_by_its_own_worker_lets_that_worker_go() {
        // A job holds the last reference to its team (as a CPU share's completion holds the
        // pager that owns the team), so the team is dropped on the worker releasing the job.
        struct Last {
            team: Mutex<Option<Arc<Team>>>,
            gate: Arc<AtomicBool>,
            dropped: Mutex<std::sync::mpsc::Sender<()>>,
        }
        impl Drop for Last {
            fn drop(&mut self) {
                let team = lock(&self.team).take();
                // A panic here (a worker joining itself) never reaches the send.
                drop(team);
                let _ = lock(&self.dropped).send(());
            }
        }
        impl TeamJob for Last {
            fn phases(&self) -> usize {
                1
            }
            fn chunks(&self, _: usize) -> usize {
                4
            }
            fn run(&self, _: usize, _: usize) {
                while !self.gate.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
            }
            fn finish(&self) {}
            fn failed(&self, _: String) {}
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let gate = Arc::new(AtomicBool::new(false));
        let team = Arc::new(Team::new(2, Duration::from_millis(1)).unwrap());
        team.submit(Arc::new(Last {
            team: Mutex::new(Some(team.clone())),
            gate: gate.clone(),
            dropped: Mutex::new(tx),
        }));
        drop(team);
        gate.store(true, Ordering::Release);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn a_panicking_chunk_is_reported_and_the_job_still_finishes() {
        let team = Team::new(3, Duration::from_millis(1)).unwrap();
        let job = Sum::new(16, 16, Some(5));
        team.submit(job.clone());
        assert_eq!(job.wait(), expect(16, 16, Some(5)));
        assert_eq!(job.failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_empty_job_finishes_at_submission() {
        struct Empty(AtomicBool);
        impl TeamJob for Empty {
            fn phases(&self) -> usize {
                2
            }
            fn chunks(&self, _: usize) -> usize {
                0
            }
            fn run(&self, _: usize, _: usize) {
                unreachable!("no chunks")
            }
            fn finish(&self) {
                self.0.store(true, Ordering::Release);
            }
            fn failed(&self, _: String) {}
        }
        let team = Team::new(2, Duration::from_millis(1)).unwrap();
        let job = Arc::new(Empty(AtomicBool::new(false)));
        team.submit(job.clone());
        assert!(job.0.load(Ordering::Acquire));
    }
}
