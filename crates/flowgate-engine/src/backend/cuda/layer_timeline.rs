//! Where a paged layer's time goes on the device (`FLOWGATE_PAGING_TIMELINE=1`, off by
//! default): events recorded on the compute stream at fixed points of each paged layer
//! ([`Mark`]), and the device time between consecutive marks summed per pair of marks. With
//! it on, `bench moe` prints the sums per token, e.g. how long the link copies, how long the
//! stream then waits for the CPU's share, and how long the rest of the token's work takes
//! between a layer's end and the next routes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use flowgate_cuda::{Device, Event, Stream};

/// Points of a paged layer's work on the stream.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Mark {
    /// The router's top-k is on the stream; the routes are about to be read back.
    Routes,
    /// The first copy of the layer's misses is next on the stream.
    CopiesStart,
    /// The layer's copies are queued.
    CopiesEnd,
    /// The GPU's expert products are queued.
    Products,
    /// The CPU's share has been waited for and added.
    Joined,
}

impl Mark {
    fn name(self) -> &'static str {
        match self {
            Mark::Routes => "routes",
            Mark::CopiesStart => "copies start",
            Mark::CopiesEnd => "copies end",
            Mark::Products => "gpu products",
            Mark::Joined => "cpu share joined",
        }
    }
}

/// Events not read yet, and the device time summed per (from, to) pair.
#[derive(Default)]
struct State {
    pending: Vec<(Mark, Event)>,
    /// The last mark read: the start of the next interval.
    last: Option<(Mark, Event)>,
    sums: BTreeMap<(Mark, Mark), (f64, u64)>,
    /// Host side: when the last routes reached the host, and the host time from there to
    /// each later mark of the same layer (summed, counted).
    routes_at: Option<std::time::Instant>,
    host: BTreeMap<Mark, (f64, u64)>,
    /// Host-only points of the queueing thread ([`LayerTimeline::probe`]), the same way.
    probes: BTreeMap<&'static str, (f64, u64)>,
}

/// See the module documentation.
pub(super) struct LayerTimeline {
    on: bool,
    state: Mutex<State>,
}

impl LayerTimeline {
    pub(super) fn from_env() -> LayerTimeline {
        LayerTimeline {
            on: std::env::var("FLOWGATE_PAGING_TIMELINE").is_ok_and(|v| v == "1"),
            state: Mutex::new(State::default()),
        }
    }

    /// The routes of a layer have reached the host (when the timeline is on).
    pub(super) fn routes_read(&self) {
        if self.on {
            super::lock(&self.state).routes_at = Some(std::time::Instant::now());
        }
    }

    /// Notes the host time from the routes' arrival to this point of the queueing thread
    /// (when the timeline is on; `name` sorts the report, e.g. "2 misses found").
    pub(super) fn probe(&self, name: &'static str) {
        if !self.on {
            return;
        }
        let now = std::time::Instant::now();
        let mut st = super::lock(&self.state);
        if let Some(t) = st.routes_at {
            let h = st.probes.entry(name).or_insert((0.0, 0));
            h.0 += 1e3 * (now - t).as_secs_f64();
            h.1 += 1;
        }
    }

    /// Records `mark` at the end of `stream` (when the timeline is on).
    pub(super) fn mark(&self, device: &Device, stream: &Stream, mark: Mark) {
        if !self.on {
            return;
        }
        let now = std::time::Instant::now();
        let Ok(ev) = Event::new(device) else { return };
        if ev.record(stream).is_err() {
            return;
        }
        let mut st = super::lock(&self.state);
        if let Some(t) = st.routes_at {
            let h = st.host.entry(mark).or_insert((0.0, 0));
            h.0 += 1e3 * (now - t).as_secs_f64();
            h.1 += 1;
        }
        if mark == Mark::Routes {
            st.routes_at = None;
        }
        st.pending.push((mark, ev));
        if st.pending.len() >= 2048 {
            Self::read(&mut st);
        }
    }

    /// Reads every pending event (waits for the last) into the sums.
    fn read(st: &mut State) {
        let pending = std::mem::take(&mut st.pending);
        if let Some((_, ev)) = pending.last() {
            let _ = ev.synchronize();
        }
        for (m, ev) in pending {
            if let Some((from, start)) = &st.last {
                if let Ok(ms) = start.elapsed_ms(&ev) {
                    let s = st.sums.entry((*from, m)).or_insert((0.0, 0));
                    s.0 += ms as f64;
                    s.1 += 1;
                }
            }
            st.last = Some((m, ev));
        }
    }

    /// The sums so far as lines (`from → to: total ms, count, mean µs`), per `tokens`
    /// tokens, then zeroed; `None` when the timeline is off.
    pub(super) fn report(&self, tokens: usize) -> Option<String> {
        if !self.on {
            return None;
        }
        let mut st = super::lock(&self.state);
        Self::read(&mut st);
        let t = tokens.max(1) as f64;
        let mut out = String::new();
        let mut total = 0.0;
        for ((a, b), (ms, n)) in &st.sums {
            total += ms;
            out.push_str(&format!(
                "  {:>16} -> {:<16} {:>8.3} ms/token  {:>7.1} per token  {:>7.1} us each\n",
                a.name(),
                b.name(),
                ms / t,
                *n as f64 / t,
                1e3 * ms / (*n).max(1) as f64
            ));
        }
        out.push_str(&format!("  total {:.3} ms/token\n", total / t));
        for (m, (ms, n)) in &st.host {
            out.push_str(&format!(
                "  host: routes read -> {:<16} queued {:>7.1} us each ({:.1} per token)\n",
                m.name(),
                1e3 * ms / (*n).max(1) as f64,
                *n as f64 / t
            ));
        }
        for (name, (ms, n)) in &st.probes {
            out.push_str(&format!(
                "  host: routes read -> {name:<24} {:>7.1} us each ({:.1} per token)\n",
                1e3 * ms / (*n).max(1) as f64,
                *n as f64 / t
            ));
        }
        st.probes.clear();
        st.host.clear();
        st.sums.clear();
        st.last = None;
        Some(out)
    }
}
