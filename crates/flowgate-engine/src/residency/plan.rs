//! [`HostPlan`]: where a model's weights live under a RAM budget.
//!
//! Dense tensors (embeddings, attention, norms, routers, shared experts, dense FFN layers) are
//! placed first and stay resident: every token needs them. What is left of the budget becomes
//! the expert cache, in whole slots of the largest expert's size; if that holds every expert,
//! nothing is paged. A budget too small for the dense part plus one expert is refused with the
//! numbers, before anything is read.
//!
//! The budget covers the model's weights as loaded (each tensor rounded up to a page, as the
//! allocator takes it) and the cache slots. The KV cache and activations are separate and are
//! shown next to the plan.

use flowgate_formats::{ModelSpec, TensorCatalog};

use super::budget::fmt_size;
use super::host_tier::ExpertLayout;
use super::policy::PolicyKind;
use crate::error::{EngineError, Result};

/// Bytes a loaded tensor of `n` bytes occupies (page-rounded).
pub fn charged_bytes(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// The placement of one model under a RAM budget.
#[derive(Clone, Debug)]
pub struct HostPlan {
    pub budget: u64,
    /// Dense tensors, as charged.
    pub dense_bytes: u64,
    pub n_dense_tensors: usize,
    /// The experts, if the model has any.
    pub experts: Option<ExpertLayout>,
    /// Expert tensors as charged when all are loaded (0 for a dense model).
    pub experts_bytes: u64,
    /// Every expert fits: nothing is paged.
    pub resident_all: bool,
    /// Expert cache slots when paged.
    pub n_slots: usize,
    pub policy: PolicyKind,
}

impl HostPlan {
    pub fn new(
        spec: &ModelSpec,
        catalog: &TensorCatalog,
        budget: u64,
        policy: PolicyKind,
    ) -> Result<HostPlan> {
        let experts = if spec.moe.is_some() {
            Some(ExpertLayout::new(spec, catalog)?)
        } else {
            None
        };
        let dense: Vec<u64> = catalog
            .iter()
            .filter(|t| experts.is_none() || !ExpertLayout::is_expert_tensor(&t.name))
            .map(|t| charged_bytes(t.nbytes))
            .collect();
        let dense_bytes: u64 = dense.iter().sum();
        let experts_bytes: u64 = catalog
            .iter()
            .filter(|t| experts.is_some() && ExpertLayout::is_expert_tensor(&t.name))
            .map(|t| charged_bytes(t.nbytes))
            .sum();
        let mut plan = HostPlan {
            budget,
            dense_bytes,
            n_dense_tensors: dense.len(),
            experts,
            experts_bytes,
            resident_all: dense_bytes + experts_bytes <= budget,
            n_slots: 0,
            policy,
        };
        let Some(layout) = &plan.experts else {
            if dense_bytes > budget {
                return Err(EngineError::Invalid(format!(
                    "the model needs {} of RAM for its weights; the budget is {} (a dense \
                     model is not paged: raise --ram-budget)",
                    fmt_size(dense_bytes),
                    fmt_size(budget)
                )));
            }
            return Ok(plan);
        };
        if plan.resident_all {
            return Ok(plan);
        }
        let need = dense_bytes + layout.slot_bytes;
        if need > budget {
            return Err(EngineError::Invalid(format!(
                "--ram-budget {} is too small: the dense part needs {} and one expert slot {} \
                 (at least {} in all)",
                fmt_size(budget),
                fmt_size(dense_bytes),
                fmt_size(layout.slot_bytes),
                fmt_size(need)
            )));
        }
        let fit = ((budget - dense_bytes) / layout.slot_bytes) as usize;
        plan.n_slots = fit.min(layout.n_paged());
        Ok(plan)
    }

    /// Whether experts are paged (the cache cannot hold them all).
    pub fn paged(&self) -> bool {
        self.experts.is_some() && !self.resident_all
    }

    /// Bytes charged to the budget when the model is loaded by this plan.
    pub fn charged(&self) -> u64 {
        let experts = match &self.experts {
            Some(l) if self.paged() => self.n_slots as u64 * l.slot_bytes,
            _ => self.experts_bytes,
        };
        self.dense_bytes + experts
    }

    /// A human-readable account of the plan (`--explain-placement`).
    pub fn explain(&self) -> String {
        let mut s = format!("placement under --ram-budget {}\n", fmt_size(self.budget));
        s += &format!(
            "  dense weights   {:>12}  {} tensors, resident in RAM\n",
            fmt_size(self.dense_bytes),
            self.n_dense_tensors
        );
        match &self.experts {
            None => s += "  experts         none (dense model)\n",
            Some(l) if !self.paged() => {
                s += &format!(
                    "  experts         {:>12}  all {} resident in RAM (fits the budget)\n",
                    fmt_size(self.experts_bytes),
                    l.n_paged()
                );
            }
            Some(l) => {
                let frac = self.n_slots as f64 / l.n_paged() as f64;
                s += &format!(
                    "  expert cache    {:>12}  {} slots of {} ({:.1}% of {} experts), policy {}\n",
                    fmt_size(self.n_slots as u64 * l.slot_bytes),
                    self.n_slots,
                    fmt_size(l.slot_bytes),
                    100.0 * frac,
                    l.n_paged(),
                    self.policy.name()
                );
                s += &format!(
                    "  on disk         {:>12}  experts paged in from the model file on demand\n",
                    fmt_size(l.total_bytes)
                );
            }
        }
        s += &format!(
            "  charged         {:>12}  of {} (KV cache and activations not included)\n",
            fmt_size(self.charged()),
            fmt_size(self.budget)
        );
        s
    }
}
