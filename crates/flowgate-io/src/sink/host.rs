//! The host sink: destinations are [`AlignedBuf`]s in host memory. Reads land in them
//! directly where the plan allows (aligned direct reads, buffered `pread`s); what comes out of a
//! bounce buffer is copied (`memcpy`, synchronous, so reclaiming a buffer costs nothing).
//!
//! [`HostView`] is one request's bytes inside a shared arena (see [`crate::sink`]).

use std::ops::Range;
use std::sync::Arc;

use super::Sink;
use crate::engine::Dest;
use crate::{AlignedBuf, IoError};

/// Host memory destinations, one per destination index.
pub(crate) struct HostSink {
    dests: Vec<Dest>,
}

// SAFETY: the raw pointers are only written through `deliver` and by reads the plan makes
// disjoint (every byte of every destination is written by exactly one read or delivery), so
// sharing the table between threads is like sharing disjoint `&mut [u8]`s.
unsafe impl Sync for HostSink {}

impl HostSink {
    /// Destinations `bufs` (borrowed mutably for as long as the sink lives).
    pub fn new(bufs: &mut [AlignedBuf]) -> HostSink {
        HostSink {
            dests: bufs
                .iter_mut()
                .map(|b| Dest {
                    len: b.len(),
                    ptr: b.raw(),
                })
                .collect(),
        }
    }
}

impl Sink for HostSink {
    fn name(&self) -> &'static str {
        "host"
    }

    fn landing(&self, dest: usize) -> Option<Dest> {
        self.dests.get(dest).copied()
    }

    fn lands(&self) -> bool {
        true
    }

    fn deliver(
        &self,
        _staging: Option<usize>,
        dest: usize,
        dst_off: usize,
        src: &[u8],
    ) -> Result<(), IoError> {
        let d = self
            .dests
            .get(dest)
            .filter(|d| dst_off.checked_add(src.len()).is_some_and(|e| e <= d.len))
            .ok_or_else(|| {
                IoError::Plan(format!(
                    "delivery of {} bytes at {dst_off} outside destination {dest}",
                    src.len()
                ))
            })?;
        if !src.is_empty() {
            // SAFETY: in bounds (checked above); no other read or delivery writes these bytes,
            // and `src` is a staging buffer, never a destination, so they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.ptr.add(dst_off), src.len()) };
        }
        Ok(())
    }
}

/// One request's bytes: `range` of a shared arena (read-only, cheap to clone).
#[derive(Clone)]
pub struct HostView {
    arena: Arc<AlignedBuf>,
    range: Range<usize>,
}

impl HostView {
    pub(crate) fn new(arena: Arc<AlignedBuf>, range: Range<usize>) -> Option<HostView> {
        (range.start <= range.end && range.end <= arena.len()).then_some(HostView { arena, range })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.arena.get(self.range.clone()).unwrap_or_default()
    }

    /// The arena holding them (shared by every request of the same extent).
    pub fn arena(&self) -> &Arc<AlignedBuf> {
        &self.arena
    }

    /// Where they lie in [`HostView::arena`].
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl std::ops::Deref for HostView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for HostView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostView({:?} of a {}-byte arena)",
            self.range,
            self.arena.len()
        )
    }
}
