//! Memory budgets: parsing sizes (`256KiB`, `1.5GiB`, `8GB`) and [`Budget`], the accounting
//! that makes a budget a promise.
//!
//! Every allocation of weight memory under a budget is *charged before it is made*; a charge
//! that would take the total over the limit fails and nothing is allocated. `used` and `peak`
//! therefore come from the same accounting that refuses allocations, so what the runtime reports
//! (`--explain-placement`, `bench moe`, later `/api/ps`) is what it held.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{EngineError, Result};

/// Parses a byte size: a number (decimals allowed) and an optional unit. `B`, `KB`/`MB`/`GB`/`TB`
/// are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers of 1024; the single letters `K`/`M`/`G`/`T`
/// (as in `docker -m 8G`) mean the binary units. Case-insensitive.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || EngineError::Invalid(format!("bad size '{s}': expected e.g. 512MiB, 1.5GiB, 8GB"));
    if num.is_empty() {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = v * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a binary unit (`1.50 GiB`).
pub fn fmt_size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// A memory budget with its accounting. Shared by reference (`&Budget`) or `Arc`.
#[derive(Debug)]
pub struct Budget {
    name: &'static str,
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes, `name` for messages (`"RAM"`, `"VRAM"`).
    pub fn new(name: &'static str, limit: u64) -> Budget {
        Budget {
            name,
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Reserves `bytes` for `what`; fails (charging nothing) if the total would pass the limit.
    pub fn charge(&self, bytes: u64, what: &str) -> Result<()> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(bytes).filter(|&n| n <= self.limit);
            let Some(next) = next else {
                return Err(EngineError::Invalid(format!(
                    "{} budget exceeded: {what} needs {}, {} of {} already in use",
                    self.name,
                    fmt_size(bytes),
                    fmt_size(cur),
                    fmt_size(self.limit)
                )));
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    return Ok(());
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Returns `bytes` charged earlier.
    pub fn release(&self, bytes: u64) {
        let prev = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(prev >= bytes, "released more than charged");
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_families() {
        assert_eq!(parse_size("256KiB").unwrap(), 256 * 1024);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 * (1 << 29));
        assert_eq!(parse_size("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size(" 100 mb ").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0.5MiB").unwrap(), 512 * 1024);
        for bad in ["", "GiB", "1.2.3GB", "12XB", "-1GB", "1e30TB", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn budget_refuses_overshoot_and_tracks_peak() {
        let b = Budget::new("RAM", 1000);
        b.charge(600, "a").unwrap();
        let e = b.charge(401, "b").unwrap_err().to_string();
        assert!(e.contains("RAM budget exceeded"), "{e}");
        assert_eq!(b.used(), 600, "a refused charge must charge nothing");
        b.charge(400, "c").unwrap();
        assert_eq!(b.used(), 1000);
        b.release(700);
        assert_eq!((b.used(), b.peak(), b.available()), (300, 1000, 700));
        assert!(b.charge(u64::MAX, "huge").is_err());
    }

    #[test]
    fn budget_holds_under_concurrent_charges() {
        let b = std::sync::Arc::new(Budget::new("RAM", 10_000));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.charge(7, "x").is_ok()).count())
            })
            .collect();
        let ok: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(ok, 10_000 / 7);
        assert_eq!(b.used(), (10_000 / 7 * 7) as u64);
        assert!(b.peak() <= b.limit());
    }
}
