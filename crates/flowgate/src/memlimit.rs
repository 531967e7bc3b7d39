//! A memory cgroup of the benchmark's own, so that flowgate and llama.cpp can be measured under
//! the same memory limit (page cache included: file pages a process faults in are charged to
//! its cgroup, so an mmap-based loader gets only as much cache as the limit leaves).
//!
//! cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` lists `memory`: `memory.max`) or v1
//! (`/sys/fs/cgroup/memory/`: `memory.limit_in_bytes`). Needs root or a delegated subtree; where
//! neither works the error says so.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A memory cgroup with a limit, removed on drop (once empty).
pub struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    /// Creates `flowgate-bench-<pid>-<tag>` with `limit` bytes.
    pub fn create(tag: &str, limit: u64) -> Result<MemCgroup> {
        let name = format!("flowgate-bench-{}-{tag}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let (dir, file) = match std::fs::read_to_string(v2) {
            Ok(c) if c.split_whitespace().any(|w| w == "memory") => {
                (Path::new("/sys/fs/cgroup").join(&name), "memory.max")
            }
            _ => (
                Path::new("/sys/fs/cgroup/memory").join(&name),
                "memory.limit_in_bytes",
            ),
        };
        std::fs::create_dir(&dir).with_context(|| {
            format!(
                "creating memory cgroup {} (needs root or a delegated cgroup)",
                dir.display()
            )
        })?;
        let cg = MemCgroup { dir };
        std::fs::write(cg.dir.join(file), limit.to_string())
            .with_context(|| format!("setting {file} of {}", cg.dir.display()))?;
        // v1: no swap either, where the knob exists (otherwise the limit leaks to swap).
        let _ = std::fs::write(
            cg.dir.join("memory.memsw.limit_in_bytes"),
            limit.to_string(),
        );
        let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
        Ok(cg)
    }

    /// `cgroup.procs` path, for a child that moves itself in before `exec`.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Peak memory charged to the cgroup (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`).
    pub fn peak(&self) -> Option<u64> {
        ["memory.peak", "memory.max_usage_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .and_then(|s| s.trim().parse().ok())
    }

    /// Moves this process back to the root cgroup of its hierarchy.
    pub fn leave(&self) -> Result<()> {
        let parent = self
            .dir
            .parent()
            .context("cgroup without a parent directory")?;
        std::fs::write(parent.join("cgroup.procs"), std::process::id().to_string())
            .context("leaving the benchmark cgroup")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = self.leave();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Fails unless `limit` is sane for a memory cgroup.
pub fn check_limit(limit: u64) -> Result<()> {
    if limit < 64 << 20 {
        bail!("a memory limit under 64 MiB cannot hold a benchmark process");
    }
    Ok(())
}
