//! Residency: where every weight lives, under budgets.
//!
//! - [`budget`] — `--ram-budget` / `--vram-budget` sizes and [`Budget`], the accounting that
//!   refuses any allocation that would pass the limit.
//! - [`policy`] — eviction policies: LRU (default) and LFU with aging.
//! - [`plan`] — [`HostPlan`]: dense tensors first, the rest of the budget as an expert cache.
//! - [`host_tier`] — [`HostExpertCache`]: experts paged from the model file (SSD, through
//!   flowgate-io's loader) into fixed RAM slots, pinned while a layer uses them.
//! - [`device_tier`] — the VRAM tier's bookkeeping: [`SlotMap`] (expert → device slot, per-layer
//!   quotas, eviction) and [`DevicePlan`] (how a `--vram-budget` is divided). The slots and the
//!   copies are the backend's (`backend::cuda::paging`). With both budgets there are three
//!   tiers: the device cache over a [`HostExpertCache`] (its slots page-locked,
//!   `backend::cuda::pinned_tier`) over the model file.
//! - [`layer_split`] — [`LayerSplit`]: a `--vram-budget` too small for the dense weights runs
//!   the leading layers on the CPU (the GPU layer split).
//!
//! [`load_host`] puts it together for the CPU backend: it loads the dense tensors and, if the
//! budget cannot hold every expert, builds the cache the MoE layers page through
//! (`models::moe`). Results do not depend on the budget: a cache of one slot gives the same
//! logits as everything resident (tested), only slower.

pub mod budget;
pub mod device_tier;
pub mod host_tier;
pub mod layer_split;
pub mod plan;
pub mod policy;

use std::collections::HashMap;
use std::sync::Arc;

use flowgate_formats::model::ModelFile;

pub use budget::{fmt_size, parse_size, Budget};
pub use device_tier::{Assigned, DevicePlan, RamCachePlan, SlotMap};
pub use host_tier::{CacheStats, ExpertLayout, HostExpertCache, Lease};
pub use layer_split::{LayerSplit, SplitInput};
pub use plan::HostPlan;
pub use policy::{Policy, PolicyKind};

use crate::error::Result;
use crate::weights::HostTensor;

/// What a budgeted load holds: the plan, its budget's accounting, and the expert cache if
/// experts are paged.
pub struct Residency {
    pub plan: HostPlan,
    pub budget: Arc<Budget>,
    pub cache: Option<Arc<HostExpertCache>>,
}

/// Loads `file`'s weights under a RAM budget of `budget` bytes: dense tensors (all tensors when
/// every expert fits), and an expert cache when they do not.
pub fn load_host(
    file: &ModelFile,
    budget: u64,
    policy: PolicyKind,
    io_threads: usize,
    progress: Option<flowgate_io::Progress>,
) -> Result<(HashMap<String, HostTensor>, Residency)> {
    let plan = HostPlan::new(&file.spec, &file.catalog, budget, policy)?;
    let acct = Arc::new(Budget::new("RAM", budget));
    let threads = if io_threads == 0 {
        flowgate_io::LoaderOptions::default().threads
    } else {
        io_threads
    };
    let paged = plan.paged();
    // Charge before reading: a refused charge reads nothing.
    acct.charge(plan.dense_bytes, "the dense weights")?;
    let tensors = if paged {
        crate::weights::load_selected(
            &file.catalog,
            |t| !ExpertLayout::is_expert_tensor(&t.name),
            threads,
            progress,
        )?
    } else {
        acct.charge(plan.experts_bytes, "the experts")?;
        crate::weights::load_all_anonymous(&file.catalog, threads, progress)?
    };
    let cache = match (&plan.experts, paged) {
        (Some(layout), true) => Some(Arc::new(HostExpertCache::new(
            layout.clone(),
            file.catalog.files.clone(),
            plan.n_slots,
            policy,
            acct.clone(),
            io_threads,
        )?)),
        _ => None,
    };
    Ok((
        tensors,
        Residency {
            plan,
            budget: acct,
            cache,
        },
    ))
}
