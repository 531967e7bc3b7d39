//! The CPU backend: weights stay in host memory in their file dtype (quant blocks as they are),
//! activations are `Vec<f32>`, matrix products run the SIMD kernels in [`kernels`], and the
//! rest (norms, rope, attention) are plain loops parallelised with rayon over the current pool.
//! [`team`] and [`experts`] serve the GPU backend: a few experts of one token computed by
//! threads that stay awake, while the GPU does the rest.

pub mod experts;
pub mod kernels;
pub mod team;

use flowgate_formats::RopeStyle;
use rayon::prelude::*;

use super::{swiglu, AttnParams, Backend, SwiGluJob};
use crate::error::{EngineError, Result};
use crate::weights::HostTensor;
use kernels::QMatrix;

/// Runs everything on the host.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// A host weight matrix (cloning shares the bytes).
#[derive(Clone)]
pub struct CpuWeight {
    t: HostTensor,
    rows: usize,
    cols: usize,
}

impl CpuWeight {
    pub fn matrix(&self) -> QMatrix<'_> {
        QMatrix {
            dtype: self.t.dtype,
            rows: self.rows,
            cols: self.cols,
            data: self.t.bytes(),
        }
    }
}

/// One layer's keys and values: `capacity × n_kv_heads × head_dim` each, position-major.
pub struct CpuKv {
    k: Vec<f32>,
    v: Vec<f32>,
    width: usize,
    capacity: usize,
}

fn try_zeros(n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| EngineError::Invalid(format!("cannot allocate {n} floats")))?;
    v.resize(n, 0.0);
    Ok(v)
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type Kv = CpuKv;
    type Experts = ();

    fn name(&self) -> String {
        format!("cpu ({})", kernels::simd_level())
    }

    fn weight(&self, t: HostTensor) -> Result<CpuWeight> {
        if t.shape.len() != 2 {
            return Err(EngineError::Weight {
                tensor: t.name.clone(),
                msg: format!("expected a matrix, found shape {:?}", t.shape),
            });
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        QMatrix::new(t.dtype, rows, cols, t.bytes()).map_err(|e| EngineError::Weight {
            tensor: t.name.clone(),
            msg: e.to_string(),
        })?;
        Ok(CpuWeight { t, rows, cols })
    }

    fn weight_rows(&self, w: &CpuWeight) -> usize {
        w.rows
    }

    fn buf_from(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn buf_zeros(&self, n: usize) -> Result<Vec<f32>> {
        try_zeros(n)
    }

    fn to_host(&self, b: &Vec<f32>) -> Vec<f32> {
        b.clone()
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let m = table.matrix();
        for &id in ids {
            if id as usize >= m.rows {
                return Err(EngineError::TokenOutOfRange { id, vocab: m.rows });
            }
        }
        out.resize(ids.len() * m.cols, 0.0);
        out.par_chunks_mut(m.cols)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| kernels::dequantize_row_into(&m, id as usize, row));
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, dim: usize, eps: f32, out: &mut Vec<f32>) {
        out.resize(x.len(), 0.0);
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .for_each(|(o, xi)| rms_norm_row(xi, w, eps, o));
    }

    fn rms_norm_inplace(&self, x: &mut Vec<f32>, w: &Vec<f32>, dim: usize, eps: f32) {
        x.par_chunks_mut(dim).for_each(|row| {
            let r = inv_rms(row, eps);
            for (v, g) in row.iter_mut().zip(w) {
                *v = *v * r * g;
            }
        });
    }

    fn matmul(&self, w: &CpuWeight, x: &Vec<f32>, n_tokens: usize, out: &mut Vec<f32>) {
        out.resize(n_tokens * w.rows, 0.0);
        kernels::matmul(&w.matrix(), &x[..n_tokens * w.cols], n_tokens, out);
    }

    fn matmul_many(
        &self,
        ws: &[&CpuWeight],
        x: &Vec<f32>,
        n_tokens: usize,
        outs: &mut [&mut Vec<f32>],
    ) {
        let Some(first) = ws.first() else { return };
        let ms: Vec<QMatrix> = ws.iter().map(|w| w.matrix()).collect();
        let mut ys: Vec<&mut [f32]> = Vec::with_capacity(outs.len());
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            o.resize(n_tokens * w.rows, 0.0);
            ys.push(o.as_mut_slice());
        }
        kernels::matmul_many(&ms, &x[..n_tokens * first.cols], n_tokens, &mut ys);
    }

    /// Experts run side by side: with few tokens each expert's matrices are small, and
    /// splitting every one of them across all threads costs more in synchronisation than it
    /// gains; one expert per task keeps every core streaming weights.
    fn swiglu_many(&self, jobs: &[SwiGluJob<'_, Self>]) -> Result<Vec<Vec<f32>>> {
        jobs.par_iter().map(|j| swiglu(self, j)).collect()
    }

    fn add_row_bias(&self, x: &mut Vec<f32>, b: &Vec<f32>) {
        for row in x.chunks_mut(b.len()) {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) {
        gate.par_chunks_mut(4096)
            .zip(up.par_chunks(4096))
            .for_each(|(g, u)| {
                for (a, b) in g.iter_mut().zip(u) {
                    *a = *a / (1.0 + (-*a).exp()) * b;
                }
            });
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &[f32],
        style: RopeStyle,
    ) {
        let half = head_dim / 2;
        x.par_chunks_mut(n_heads * head_dim)
            .enumerate()
            .for_each(|(t, tok)| {
                let pos = (start_pos + t) as f64;
                let cs: Vec<(f32, f32)> = inv_freq
                    .iter()
                    .map(|&f| {
                        // HF computes the angle in f32; so do we, then cos/sin.
                        let a = (pos as f32) * f;
                        (a.cos(), a.sin())
                    })
                    .collect();
                for head in tok.chunks_mut(head_dim) {
                    match style {
                        RopeStyle::Halves => {
                            for i in 0..half {
                                let (c, s) = cs[i];
                                let (a, b) = (head[i], head[i + half]);
                                head[i] = a * c - b * s;
                                head[i + half] = b * c + a * s;
                            }
                        }
                        RopeStyle::Interleaved => {
                            for i in 0..half {
                                let (c, s) = cs[i];
                                let (a, b) = (head[2 * i], head[2 * i + 1]);
                                head[2 * i] = a * c - b * s;
                                head[2 * i + 1] = b * c + a * s;
                            }
                        }
                    }
                }
            });
    }

    fn kv_alloc(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<CpuKv> {
        let width = n_kv_heads * head_dim;
        let n = width
            .checked_mul(capacity)
            .ok_or_else(|| EngineError::Invalid("KV cache size overflows".into()))?;
        Ok(CpuKv {
            k: try_zeros(n)?,
            v: try_zeros(n)?,
            width,
            capacity,
        })
    }

    fn kv_write(
        &self,
        kv: &mut CpuKv,
        k: &Vec<f32>,
        v: &Vec<f32>,
        n_tokens: usize,
        start_pos: usize,
    ) {
        let w = kv.width;
        debug_assert!(start_pos + n_tokens <= kv.capacity);
        kv.k[start_pos * w..(start_pos + n_tokens) * w].copy_from_slice(&k[..n_tokens * w]);
        kv.v[start_pos * w..(start_pos + n_tokens) * w].copy_from_slice(&v[..n_tokens * w]);
    }

    fn kv_read(&self, kv: &CpuKv, start: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = kv.width;
        crate::backend::kv_range(start, n, kv.capacity)?;
        let r = start * w..(start + n) * w;
        Ok((kv.k[r.clone()].to_vec(), kv.v[r].to_vec()))
    }

    fn attention(&self, q: &Vec<f32>, kv: &CpuKv, p: AttnParams, out: &mut Vec<f32>) {
        let hd = p.head_dim;
        let qw = p.n_heads * hd;
        let group = p.n_heads / p.n_kv_heads;
        out.resize(p.n_tokens * qw, 0.0);
        // One task per (token, head): independent output slices.
        out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
            let t = i / p.n_heads;
            let h = i % p.n_heads;
            let kvh = h / group;
            let pos = p.start_pos + t;
            let first = match p.window {
                Some(w) if w > 0 => (pos + 1).saturating_sub(w),
                _ => 0,
            };
            let qv = &q[t * qw + h * hd..t * qw + (h + 1) * hd];
            let mut scores = Vec::with_capacity(pos + 1 - first);
            let mut max = f32::NEG_INFINITY;
            for j in first..=pos {
                let kv_row = &kv.k[j * kv.width + kvh * hd..j * kv.width + (kvh + 1) * hd];
                let s = dot(qv, kv_row) * p.scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (j, s) in (first..=pos).zip(&scores) {
                let vr = &kv.v[j * kv.width + kvh * hd..j * kv.width + (kvh + 1) * hd];
                let wgt = s / sum;
                for (a, b) in o.iter_mut().zip(vr) {
                    *a += wgt * b;
                }
            }
        });
    }

    fn gather_rows(&self, x: &Vec<f32>, dim: usize, idx: &[usize]) -> Result<Vec<f32>> {
        let mut out = try_zeros(idx.len() * dim)?;
        for (o, &i) in out.chunks_mut(dim).zip(idx) {
            o.copy_from_slice(&x[i * dim..(i + 1) * dim]);
        }
        Ok(out)
    }

    fn scatter_add_rows(
        &self,
        out: &mut Vec<f32>,
        y: &Vec<f32>,
        dim: usize,
        idx: &[usize],
        scale: &[f32],
    ) {
        for ((yr, &i), &s) in y.chunks(dim).zip(idx).zip(scale) {
            for (a, b) in out[i * dim..(i + 1) * dim].iter_mut().zip(yr) {
                *a += s * b;
            }
        }
    }

    fn resize(&self, b: &mut Vec<f32>, n: usize) -> Result<()> {
        if n > b.capacity() {
            b.try_reserve_exact(n - b.len())
                .map_err(|_| EngineError::Invalid(format!("cannot allocate {n} floats")))?;
        }
        b.resize(n, 0.0);
        Ok(())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators let the compiler vectorise without reassociation flags.
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (1.0 / ((ss / x.len() as f64) + eps as f64).sqrt()) as f32
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let r = inv_rms(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * g;
    }
}
