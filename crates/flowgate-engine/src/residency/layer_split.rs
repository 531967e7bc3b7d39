//! The GPU layer split: when `--vram-budget` cannot hold a model's dense weights, its leading
//! layers run on the CPU from host RAM and the rest on the GPU (what Ollama and llama.cpp's
//! `-ngl` do). [`LayerSplit::plan`] picks the fewest CPU layers that let the rest fit.
//!
//! The first layers go to the CPU, not the last: the token embedding (a row lookup, no
//! matrix product) then stays in host RAM with them, and the output head, the largest single
//! matrix and the one every step ends with, stays on the GPU. A layer's keys and values live
//! where the layer runs, so every layer moved to the CPU also frees its share of the KV cache.

use flowgate_formats::catalog::{names, TensorCatalog};
use flowgate_formats::ModelSpec;

use super::budget::fmt_size;
use crate::error::{EngineError, Result};

/// What the device must hold, per part, for [`LayerSplit::plan`].
#[derive(Clone, Debug)]
pub struct SplitInput {
    pub budget: u64,
    /// Device bytes of each layer's weights when the layer runs on the GPU (for a paged MoE
    /// layer: its dense tensors and the fewest expert slots it may run with).
    pub layer_bytes: Vec<u64>,
    /// One layer's KV cache (every position of the context).
    pub kv_layer_bytes: u64,
    /// The output head: norm and projection (and the embedding, when the projection is it).
    pub head_bytes: u64,
    /// The token embedding when it is a tensor of its own: on the device only when layer 0 is.
    pub embd_bytes: u64,
    /// Activations, prefill tiles and logits.
    pub act_bytes: u64,
    /// Keep room for one CPU layer and its KV cache on the device, so that a long prompt can
    /// run the CPU layers there one at a time (`Model::set_prefill_offload`).
    pub staging: bool,
}

/// Where each layer runs under a `--vram-budget` that cannot hold the whole model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSplit {
    pub budget: u64,
    pub n_layers: usize,
    /// Layers `0..n_host` run on the CPU, `n_host..n_layers` on the GPU.
    pub n_host: usize,
    /// Weights in host RAM (the CPU layers, and the embedding with them).
    pub host_bytes: u64,
    /// Weights on the device (GPU layers and output head), as planned.
    pub device_bytes: u64,
    pub kv_host_bytes: u64,
    pub kv_device_bytes: u64,
    pub act_bytes: u64,
    /// Room kept for one CPU layer (weights and KV cache) during a long prompt.
    pub staging_bytes: u64,
    /// The embedding is looked up on the CPU (layer 0 is there).
    pub embd_on_host: bool,
}

impl LayerSplit {
    /// The fewest leading layers on the CPU that let the rest fit `budget`; `n_host` is 0 when
    /// everything fits. An error names the numbers when not even the output head fits.
    pub fn plan(i: &SplitInput) -> Result<LayerSplit> {
        let n = i.layer_bytes.len();
        let fixed = i.head_bytes + i.act_bytes;
        // suffix[k]: device bytes of layers k.. with their KV caches.
        let mut suffix = vec![0u64; n + 1];
        for l in (0..n).rev() {
            suffix[l] = suffix[l + 1] + i.layer_bytes[l] + i.kv_layer_bytes;
        }
        // The largest of layers ..k, for the staging room.
        let mut largest = vec![0u64; n + 1];
        for l in 0..n {
            largest[l + 1] = largest[l].max(i.layer_bytes[l]);
        }
        let staging = |k: usize| match (k, i.staging) {
            (0, _) | (_, false) => 0,
            _ => largest[k] + i.kv_layer_bytes,
        };
        let need =
            |k: usize| fixed + suffix[k] + staging(k) + if k == 0 { i.embd_bytes } else { 0 };
        let Some(k) = (0..=n).find(|&k| need(k) <= i.budget) else {
            return Err(EngineError::Invalid(format!(
                "--vram-budget {}: even with every layer on the CPU the GPU needs {} (output \
                 head {}, activations and prefill tiles {}); raise the budget or use --device cpu",
                fmt_size(i.budget),
                fmt_size(need(n)),
                fmt_size(i.head_bytes),
                fmt_size(i.act_bytes)
            )));
        };
        let host_layers: u64 = i.layer_bytes[..k].iter().sum();
        Ok(LayerSplit {
            budget: i.budget,
            n_layers: n,
            n_host: k,
            host_bytes: host_layers + if k > 0 { i.embd_bytes } else { 0 },
            device_bytes: need(k) - i.act_bytes - (n - k) as u64 * i.kv_layer_bytes - staging(k),
            kv_host_bytes: k as u64 * i.kv_layer_bytes,
            kv_device_bytes: (n - k) as u64 * i.kv_layer_bytes,
            act_bytes: i.act_bytes,
            staging_bytes: staging(k),
            embd_on_host: k > 0,
        })
    }

    /// Whether some layers run on the CPU.
    pub fn is_split(&self) -> bool {
        self.n_host > 0
    }

    /// What `--explain-placement` prints.
    pub fn explain(&self) -> String {
        let mut s = format!(
            "placement under --vram-budget {}: GPU layer split\n",
            fmt_size(self.budget)
        );
        let range = |a: usize, b: usize| match b - a {
            0 => "none".to_string(),
            1 => format!("layer {a}"),
            _ => format!("layers {a}–{}", b - 1),
        };
        s += &format!(
            "  CPU             {:>12}  {} of {} in host RAM{}, their KV cache {}\n",
            fmt_size(self.host_bytes),
            range(0, self.n_host),
            self.n_layers,
            if self.embd_on_host {
                " with the token embedding"
            } else {
                ""
            },
            fmt_size(self.kv_host_bytes)
        );
        s += &format!(
            "  GPU             {:>12}  {} and the output head, their KV cache {}\n",
            fmt_size(self.device_bytes),
            range(self.n_host, self.n_layers),
            fmt_size(self.kv_device_bytes)
        );
        s += &format!(
            "  reserve         {:>12}  activations, prefill tiles, logits\n",
            fmt_size(self.act_bytes)
        );
        if self.staging_bytes > 0 {
            s += &format!(
                "  staging         {:>12}  one CPU layer and its KV cache: a prompt of {}+ \
                 tokens runs the CPU layers on the GPU, copied in one at a time\n",
                fmt_size(self.staging_bytes),
                crate::models::PREFILL_OFFLOAD_MIN
            );
        }
        s
    }
}

/// The layer a tensor belongs to (`blk.N.…`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Per-layer device bytes of a model file's weights (every tensor of the layer, experts
/// included; vectors as f32, the form they take on a device), the bytes of its head (output
/// norm and projection, or the embedding when tied) and of its embedding when that is a
/// tensor of its own: the inputs of [`SplitInput`] for a model whose layers are placed whole.
pub fn layer_bytes(spec: &ModelSpec, catalog: &TensorCatalog) -> (Vec<u64>, u64, u64) {
    bytes_by_layer(spec, catalog, true)
}

/// [`layer_bytes`] without the experts (a model whose experts are paged).
pub fn dense_layer_bytes(spec: &ModelSpec, catalog: &TensorCatalog) -> (Vec<u64>, u64, u64) {
    bytes_by_layer(spec, catalog, false)
}

fn bytes_by_layer(
    spec: &ModelSpec,
    catalog: &TensorCatalog,
    experts: bool,
) -> (Vec<u64>, u64, u64) {
    let mut layers = vec![0u64; spec.n_layers];
    let (mut head, mut embd) = (0u64, 0u64);
    let tied = !catalog.contains(names::OUTPUT);
    for t in catalog
        .iter()
        .filter(|t| experts || !super::ExpertLayout::is_expert_tensor(&t.name))
    {
        // Vectors (norms, biases) go to the device as f32; matrices as stored.
        let bytes = if t.shape.len() == 1 {
            4 * t.numel()
        } else {
            t.nbytes
        };
        match layer_of(&t.name) {
            Some(l) if l < layers.len() => layers[l] += bytes,
            Some(_) => {}
            None if t.name == names::TOKEN_EMBD && !tied => embd += bytes,
            None if t.name == names::TOKEN_EMBD
                || t.name == names::OUTPUT
                || t.name == names::OUTPUT_NORM =>
            {
                head += bytes
            }
            None => {}
        }
    }
    (layers, head, embd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(budget: u64) -> SplitInput {
        SplitInput {
            budget,
            layer_bytes: vec![100; 8],
            kv_layer_bytes: 10,
            head_bytes: 200,
            embd_bytes: 150,
            act_bytes: 50,
            staging: false,
        }
    }

    #[test]
    fn everything_fits_means_no_split() {
        // 8 × 110 + 200 + 150 + 50 = 1280.
        let p = LayerSplit::plan(&input(1280)).unwrap();
        assert_eq!(p.n_host, 0);
        assert!(!p.is_split());
        assert_eq!(p.device_bytes, 800 + 200 + 150);
        assert_eq!(p.kv_device_bytes, 80);
        assert_eq!(p.host_bytes, 0);
    }

    #[test]
    fn fewest_layers_move_and_the_embedding_goes_with_them() {
        // One byte short: layer 0 (110) and the embedding (150) leave the device.
        let p = LayerSplit::plan(&input(1279)).unwrap();
        assert_eq!(p.n_host, 1);
        assert!(p.embd_on_host);
        assert_eq!(p.host_bytes, 100 + 150);
        assert_eq!(p.kv_host_bytes, 10);
        // 7 layers + head + activations = 770 + 250 = 1020.
        assert_eq!(p.device_bytes + p.kv_device_bytes + p.act_bytes, 1020);
        // At 1020 exactly, still one; at 1019, two.
        assert_eq!(LayerSplit::plan(&input(1020)).unwrap().n_host, 1);
        assert_eq!(LayerSplit::plan(&input(1019)).unwrap().n_host, 2);
    }

    #[test]
    fn the_plan_never_exceeds_the_budget() {
        for budget in 250..1400 {
            let p = LayerSplit::plan(&input(budget)).unwrap();
            let device = p.device_bytes + p.kv_device_bytes + p.act_bytes;
            assert!(device <= budget, "{budget}: {p:?}");
            if p.n_host > 0 {
                // One layer fewer on the CPU would not fit.
                let back = device + 110 + if p.n_host == 1 { 150 } else { 0 };
                assert!(back > budget, "{budget}: {p:?}");
            }
        }
    }

    #[test]
    fn a_budget_below_the_head_is_a_clear_error() {
        let e = LayerSplit::plan(&input(249)).unwrap_err().to_string();
        assert!(e.contains("--device cpu"), "{e}");
        assert!(e.contains("output head"), "{e}");
        let all_host = LayerSplit::plan(&input(250)).unwrap();
        assert_eq!(all_host.n_host, 8);
        assert!(all_host.explain().contains("layers 0–7 of 8"));
    }

    #[test]
    fn staging_keeps_room_for_one_cpu_layer() {
        let mut i = input(1279);
        i.staging = true;
        i.layer_bytes[0] = 300;
        // Whole: 8 layers (1000) + 80 KV + 200 + 150 + 50 = 1480: fits, no staging needed.
        assert_eq!(
            LayerSplit::plan(&SplitInput {
                budget: 1480,
                ..i.clone()
            })
            .unwrap()
            .n_host,
            0
        );
        // One short: layer 0 leaves, and room for it (300) and its KV (10) stays.
        let p = LayerSplit::plan(&SplitInput {
            budget: 1479,
            ..i.clone()
        })
        .unwrap();
        // k = 1: 250 + 7 × 110 + 310 = 1330 ≤ 1479.
        assert_eq!(p.n_host, 1);
        assert_eq!(p.staging_bytes, 310);
        assert_eq!(p.device_bytes, 700 + 200);
        assert!(p.explain().contains("staging"));
        // 1329: k = 2 needs 250 + 660 + 310 = 1220.
        let p = LayerSplit::plan(&SplitInput {
            budget: 1329,
            ..i.clone()
        })
        .unwrap();
        assert_eq!(p.n_host, 2);
        for budget in 560..1480 {
            let p = LayerSplit::plan(&SplitInput {
                budget,
                ..i.clone()
            })
            .unwrap();
            let device = p.device_bytes + p.kv_device_bytes + p.act_bytes + p.staging_bytes;
            assert!(device <= budget, "{budget}: {p:?}");
        }
    }

    #[test]
    fn tensors_are_assigned_to_their_layers() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("blk.x.attn_q.weight"), None);
        assert_eq!(layer_of("token_embd.weight"), None);
        assert_eq!(layer_of("blk."), None);
    }
}
