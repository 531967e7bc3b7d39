//! Expert paging is invisible to results: on every MoE fixture, the logits with a RAM budget
//! whose cache holds one expert per sparse layer (and, harder, a single expert in all) equal
//! those with every expert resident, bit for bit, in one prefill pass and token by token. The
//! paged runs must really page (misses, evictions, bytes read) and stay within the budget by the
//! budget's own accounting.

#[path = "model_common/mod.rs"]
mod model_common;

use std::path::PathBuf;

use flowgate_engine::backend::cpu::CpuBackend;
use flowgate_engine::models::Model;
use flowgate_engine::residency::{self, HostPlan, PolicyKind};
use flowgate_engine::runtime::{self, LoadOptions};
use model_common::{assert_same, fixtures, hf_case, prefill_and_decode, tokens};

/// (model path, reference json with the prompt tokens)
fn moe_fixtures() -> Vec<(PathBuf, PathBuf)> {
    let f = fixtures();
    let mut v: Vec<(PathBuf, PathBuf)> = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
        .iter()
        .map(|n| hf_case(n))
        .collect();
    for q in ["f32", "q8_0"] {
        v.push((
            f.join(format!("gguf/qwen3_moe-{q}.gguf")),
            f.join("gguf/qwen3_moe-q8_0.ref.json"),
        ));
    }
    v
}

#[test]
fn paging_experts_does_not_change_logits() {
    for (path, json) in moe_fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let toks = tokens(&json);
        let full = runtime::load(&path, &LoadOptions::default()).unwrap();
        let (pre_ref, dec_ref) = prefill_and_decode(&full.model, &toks);
        let file = flowgate_formats::model::open(&path).unwrap();
        let probe = HostPlan::new(&file.spec, &file.catalog, u64::MAX, PolicyKind::Lru).unwrap();
        let layout = probe.experts.clone().unwrap();
        let sparse_layers = layout.n_paged() / layout.n_experts;
        assert!(sparse_layers > 0);
        // (slots, policy, speculative prefetch of the next layer's predicted experts)
        for (slots, policy, speculative) in [
            (sparse_layers, PolicyKind::Lru, false),
            (1, PolicyKind::LfuAging, false),
            (2 * sparse_layers, PolicyKind::Lru, true),
        ] {
            let budget = probe.dense_bytes + slots as u64 * layout.slot_bytes;
            let (tensors, res) = residency::load_host(&file, budget, policy, 2, None).unwrap();
            assert!(res.plan.paged(), "{name}: budget {budget} should page");
            assert_eq!(res.plan.n_slots, slots);
            let cache = res.cache.clone().unwrap();
            cache.set_speculative(speculative);
            let model = Model::with_expert_cache(
                file.spec.clone(),
                CpuBackend,
                tensors,
                Some(cache.clone()),
            )
            .unwrap();
            let (pre, dec) = prefill_and_decode(&model, &toks);
            let what = format!(
                "{name}, {slots} slot(s), {}, prefetch {speculative}",
                policy.name()
            );
            assert_same(&pre, &pre_ref, &format!("{what}, prefill"));
            assert_same(&dec, &dec_ref, &format!("{what}, decode"));
            let st = cache.stats();
            assert!(st.total_misses() > 0 && st.evictions > 0, "{what}: {st:?}");
            if speculative && sparse_layers > 1 {
                assert!(st.prefetched > 0, "{what}: nothing prefetched: {st:?}");
                assert!(st.prefetch_used <= st.prefetched);
            } else {
                assert_eq!(st.prefetched, 0, "{what}");
            }
            assert!(
                st.bytes_read >= st.total_misses() * (layout.total_bytes / layout.n_paged() as u64)
            );
            assert_eq!(st.hits.len(), file.spec.n_layers);
            assert_eq!(res.budget.used(), res.plan.charged(), "{what}");
            assert!(res.budget.peak() <= budget, "{what}: peak over budget");
            drop(model);
            drop(cache);
            drop(res.cache);
            assert_eq!(
                res.budget.used(),
                res.plan.dense_bytes,
                "{what}: slots returned"
            );
        }
    }
}

#[test]
fn budgets_are_checked_before_loading() {
    let path = fixtures().join("qwen3_moe");
    let file = flowgate_formats::model::open(&path).unwrap();
    let plan = HostPlan::new(&file.spec, &file.catalog, u64::MAX, PolicyKind::Lru).unwrap();
    assert!(!plan.paged(), "an unlimited budget pages nothing");
    let slot = plan.experts.as_ref().unwrap().slot_bytes;
    // Dense part plus not quite one slot: refused, with the numbers.
    let too_small = plan.dense_bytes + slot - 1;
    let e = residency::load_host(&file, too_small, PolicyKind::Lru, 2, None)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("too small") && e.contains("dense part"), "{e}");
    // Just enough for everything: not paged, everything charged.
    let all = plan.dense_bytes + plan.experts_bytes;
    let (_, res) = residency::load_host(&file, all, PolicyKind::Lru, 2, None).unwrap();
    assert!(!res.plan.paged() && res.cache.is_none());
    assert_eq!(res.budget.used(), all);
    let text = res.plan.explain();
    assert!(text.contains("resident in RAM"), "{text}");
    // A dense model that does not fit is refused, not paged.
    let dense = flowgate_formats::model::open(&fixtures().join("llama")).unwrap();
    let e = HostPlan::new(&dense.spec, &dense.catalog, 4096, PolicyKind::Lru)
        .unwrap_err()
        .to_string();
    assert!(e.contains("raise --ram-budget"), "{e}");
}

/// What the VRAM tier needs from the RAM cache under it: the memory of every slot listed in a
/// few regions (to page-lock it), the same before and after reads; a lease that owns its pins
/// (it can go to another thread, as a CPU share's does), whose views lie in those regions, and
/// that keeps its experts' slots busy until dropped.
#[test]
fn leases_own_their_pins_and_slots_are_listed() {
    let path = fixtures().join("qwen3_moe");
    let file = flowgate_formats::model::open(&path).unwrap();
    let plan = HostPlan::new(&file.spec, &file.catalog, u64::MAX, PolicyKind::Lru).unwrap();
    let slot = plan.experts.as_ref().unwrap().slot_bytes;
    let budget = plan.dense_bytes + 6 * slot;
    let (_, res) = residency::load_host(&file, budget, PolicyKind::Lru, 2, None).unwrap();
    let cache = res.cache.clone().expect("paged");
    assert_eq!(cache.capacity(), 6);
    let regions = cache.memory_regions();
    let total: usize = regions.iter().map(|r| r.1).sum();
    assert!(
        total as u64 >= 6 * slot,
        "{total} bytes for 6 slots of {slot}"
    );
    let inside = |p: usize| {
        regions
            .iter()
            .any(|r| p >= r.0 as usize && p < r.0 as usize + r.1)
    };
    let layer = (0..file.spec.n_layers)
        .find(|&l| file.spec.is_sparse_layer(l))
        .unwrap();
    let lease = cache.acquire(layer, &[0, 3]).unwrap();
    assert_eq!((lease.len(), cache.busy_slots()), (2, 2));
    for t in lease.tensors.iter().flatten() {
        let p = t.bytes().as_ptr() as usize;
        assert!(
            inside(p) && inside(p + t.bytes().len() - 1),
            "{} outside",
            t.name
        );
    }
    let sum = std::thread::spawn(move || {
        let s: u64 = lease.tensors[0][0].bytes().iter().map(|&b| b as u64).sum();
        drop(lease);
        s
    })
    .join()
    .unwrap();
    assert!(sum > 0, "the expert's bytes were read");
    assert_eq!(cache.busy_slots(), 0, "the lease's pins went with it");
    // Fill every slot (and evict): the slots stay where they were.
    for e in 0..8 {
        drop(cache.acquire(layer, &[e]).unwrap());
    }
    assert_eq!(cache.memory_regions(), regions);
}

/// The RAM tier under VRAM keeps to what VRAM does not hold: an expert demoted (copied up)
/// is the next to go, one kept below (evicted from VRAM) the last.
#[test]
fn demoted_experts_go_first_and_kept_ones_last() {
    let path = fixtures().join("qwen3_moe");
    let file = flowgate_formats::model::open(&path).unwrap();
    let plan = HostPlan::new(&file.spec, &file.catalog, u64::MAX, PolicyKind::Lru).unwrap();
    let slot = plan.experts.as_ref().unwrap().slot_bytes;
    let layer = (0..file.spec.n_layers)
        .find(|&l| file.spec.is_sparse_layer(l))
        .unwrap();
    for policy in [PolicyKind::Lru, PolicyKind::LfuAging] {
        // Four slots in all, filled by `layer`: a miss then evicts one of its own.
        let budget = plan.dense_bytes + 4 * slot;
        let (_, res) = residency::load_host(&file, budget, policy, 2, None).unwrap();
        let cache = res.cache.clone().unwrap();
        for e in [0, 1, 2, 3] {
            drop(cache.acquire(layer, &[e]).unwrap());
        }
        assert_eq!(cache.resident(layer), vec![0, 1, 2, 3], "{policy:?}");
        // 3 went up to VRAM, 0 (the oldest) came back down.
        cache.demote(layer, &[3]);
        cache.kept_below(layer, &[0]);
        drop(cache.acquire(layer, &[4]).unwrap());
        let r = cache.resident(layer);
        assert!(!r.contains(&3) && r.contains(&4), "{policy:?}: {r:?}");
        drop(cache.acquire(layer, &[5]).unwrap());
        let r = cache.resident(layer);
        assert!(r.contains(&0), "{policy:?}: kept below, still here: {r:?}");
        // Neither call counted a hit or a miss.
        let st = cache.stats();
        assert_eq!((st.total_hits(), st.total_misses()), (0, 6), "{policy:?}");
    }
}
