//! Quantised matrix-vector and matrix-matrix products on the CPU.
//!
//! Design:
//! - Weights stay in their GGUF block layout ([`QMatrix`]); nothing is repacked, so a weight
//!   costs exactly its file bytes in memory and decode streams each byte once per token.
//! - Activations are quantised once per call (or once for several matrices through
//!   [`Activations`], which quantises lazily and caches per format): Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
//!   weights pair with [`quantize::BlockQ8`] (32 i8, f32 scale, f32 `d·Σq` for the `_1` types),
//!   K-quants with [`quantize::BlockQ8K`] (256 i8, f32 scale, 16 i16 block sums), like llama.cpp.
//!   Float weights (F32/F16/BF16) use the f32 activations as they are.
//! - Dot products are integer within a block and f32 across blocks. Three implementations
//!   share one dispatch: [`dot_scalar`] (portable, the reference for the SIMD code),
//!   [`dot_avx2`] (AVX2+FMA+F16C, every dtype) and [`dot_vnni`] (AVX-512 F/BW/VL + VNNI, for
//!   Q4_K, Q6_K and Q8_0; other dtypes fall through to AVX2), chosen at run time once, see
//!   [`simd_level`].
//! - [`matmul`] parallelises over chunks of rows (16–512 rows, about 16 tasks per thread) on
//!   the *current* rayon pool (the engine installs one with `--threads` threads); each task
//!   writes its own contiguous slice of the output, so there is no false sharing.
//! - Several tokens (prefill): each chunk of rows is multiplied by every token while its bytes
//!   are in L1/L2; the K-quant kernels unpack each weight super-block once per tile of tokens
//!   (16 for AVX2, 8 for VNNI, whose tiles also walk the reduction dimension in slabs of 8
//!   super-blocks so the tile's activations stay in L1). Results are written row-major per
//!   chunk, then transposed into the token-major output.
//! - Measured on the 2-core target (Zen 5 EPYC, see `examples/kernel_bench.rs`): the AVX2
//!   Q4_K/Q6_K/Q8_0 kernels are instruction-bound (≈ 25–30 GB/s of weights per core for
//!   decode, ≈ 60 GMAC/s per core for prefill). This core runs 512-bit integer ops at full
//!   width, so the VNNI kernels use zmm `vpdpbusd`/`vpdpwssd` for the K-quants: single-thread
//!   Q4_K prefill went from ≈ 60 to ≈ 100–130 GMAC/s, Q6_K from ≈ 55 to ≈ 130.
//!
//! `unsafe` lives only in [`dot_avx2`] and [`dot_vnni`] (target-feature functions called after
//! detection).

pub mod dot_avx2;
pub mod dot_scalar;
pub mod dot_vnni;
pub mod quantize;

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use flowgate_formats::DType;
use rayon::prelude::*;

pub use quantize::{quantize_q8, quantize_q8k, BlockQ8, BlockQ8K};

/// Errors from building a [`QMatrix`] or [`Activations`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error(
        "{dtype} matrix {rows}×{cols}: {cols} columns are not a multiple of the block size {block}"
    )]
    Cols {
        dtype: DType,
        rows: usize,
        cols: usize,
        block: usize,
    },
    #[error("{dtype} matrix {rows}×{cols} needs {expected} bytes, found {found}")]
    Bytes {
        dtype: DType,
        rows: usize,
        cols: usize,
        expected: usize,
        found: usize,
    },
    #[error("{0} is an activation format, not a weight dtype")]
    NotAWeight(DType),
    #[error("activations: {len} floats is not {n_tokens} tokens × {cols} columns")]
    Acts {
        len: usize,
        n_tokens: usize,
        cols: usize,
    },
}

/// A weight matrix in host memory: `rows` rows of `cols` elements, each row a run of GGUF
/// blocks of `dtype`, rows contiguous.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks that `cols` is a whole number of blocks and `data` holds exactly `rows` rows.
    pub fn new(
        dtype: DType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        if dtype == DType::Q8K {
            return Err(KernelError::NotAWeight(dtype));
        }
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(KernelError::Cols {
                dtype,
                rows,
                cols,
                block,
            });
        }
        let expected = (cols / block)
            .checked_mul(dtype.type_size())
            .and_then(|rb| rb.checked_mul(rows));
        match expected {
            Some(e) if e == data.len() => Ok(QMatrix {
                dtype,
                rows,
                cols,
                data,
            }),
            _ => Err(KernelError::Bytes {
                dtype,
                rows,
                cols,
                expected: expected.unwrap_or(usize::MAX),
                found: data.len(),
            }),
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// The bytes of row `r`.
    ///
    /// # Panics
    /// If `r >= rows`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// The sub-matrix of rows `range` (e.g. to compute a subset of outputs).
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn rows_slice(&self, range: Range<usize>) -> QMatrix<'a> {
        assert!(
            range.start <= range.end && range.end <= self.rows,
            "row range out of bounds"
        );
        let rb = self.row_bytes();
        QMatrix {
            dtype: self.dtype,
            rows: range.end - range.start,
            cols: self.cols,
            data: &self.data[range.start * rb..range.end * rb],
        }
    }
}

/// Which instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL/VNNI (256-bit `vpdpbusd`): Q4_K/Q6_K/Q8_0 use
    /// [`dot_vnni`], every other dtype the AVX2 kernels.
    Avx512Vnni,
}

impl Isa {
    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => dot_avx2::detected(),
            Isa::Avx512Vnni => dot_vnni::detected(),
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        })
    }
}

/// The best instruction set of this machine (detected once; `FLOWGATE_FORCE_SCALAR=1` in the
/// environment forces [`Isa::Scalar`], `FLOWGATE_FORCE_AVX2=1` caps it at [`Isa::Avx2`]).
pub fn simd_level() -> Isa {
    static LEVEL: OnceLock<Isa> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("FLOWGATE_FORCE_SCALAR").is_some() {
            Isa::Scalar
        } else if std::env::var_os("FLOWGATE_FORCE_AVX2").is_none() && Isa::Avx512Vnni.available() {
            Isa::Avx512Vnni
        } else if Isa::Avx2.available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    })
}

/// Bytes ahead of the row being read that one-token dot products (decode) prefetch, in the
/// AVX-512 VNNI and AVX2 kernels: the row the hardware prefetcher has not reached yet. On the
/// H100 box's Xeon (cold weights, moe30b experts) 2 KiB took one thread from 402 to 303 µs an
/// expert (AVX2: 442–468 to 355–359) and the 12-worker CPU share 10–13% faster; 1, 4 and 8 KiB
/// did less. `FLOWGATE_CPU_PREFETCH=N` sets it (0: none), to measure.
pub(crate) fn prefetch_distance() -> usize {
    static PF: OnceLock<usize> = OnceLock::new();
    *PF.get_or_init(|| {
        std::env::var("FLOWGATE_CPU_PREFETCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048)
    })
}

/// Activation format a weight dtype multiplies against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    F32,
    Q8,
    Q8K,
}

/// The activation format `dtype` weights need.
pub fn act_format(dtype: DType) -> ActFormat {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => ActFormat::F32,
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => ActFormat::Q8,
        DType::Q4K | DType::Q5K | DType::Q6K | DType::Q8K => ActFormat::Q8K,
    }
}

/// `n_tokens` rows of f32 activations (`cols` wide, token-major) with their quantised forms,
/// computed on first use and kept: build one for `x` and pass it to [`matmul_acts`] for every
/// matrix that reads `x` (q/k/v, gate/up) so `x` is quantised once.
pub struct Activations<'x> {
    x: &'x [f32],
    cols: usize,
    n_tokens: usize,
    q8: OnceLock<Vec<BlockQ8>>,
    q8k: OnceLock<Vec<BlockQ8K>>,
}

impl<'x> Activations<'x> {
    /// Wraps `x` (`n_tokens × cols`).
    pub fn new(x: &'x [f32], cols: usize, n_tokens: usize) -> Result<Self, KernelError> {
        if cols.checked_mul(n_tokens) != Some(x.len()) {
            return Err(KernelError::Acts {
                len: x.len(),
                n_tokens,
                cols,
            });
        }
        Ok(Activations {
            x,
            cols,
            n_tokens,
            q8: OnceLock::new(),
            q8k: OnceLock::new(),
        })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn f32s(&self) -> &'x [f32] {
        self.x
    }

    /// Q8 blocks (`cols / 32` per token); `cols` must be a multiple of 32.
    pub fn q8(&self) -> &[BlockQ8] {
        self.q8
            .get_or_init(|| quantize_tokens(self.x, self.cols, 32, quantize_q8))
    }

    /// Q8_K blocks (`cols / 256` per token); `cols` must be a multiple of 256.
    pub fn q8k(&self) -> &[BlockQ8K] {
        self.q8k
            .get_or_init(|| quantize_tokens(self.x, self.cols, 256, quantize_q8k))
    }
}

fn quantize_tokens<B: Send + Default + Clone>(
    x: &[f32],
    cols: usize,
    block: usize,
    f: fn(&[f32], &mut [B]),
) -> Vec<B> {
    let per = cols / block;
    let n_tokens = x.len().checked_div(cols).unwrap_or(0);
    let mut out = vec![B::default(); per * n_tokens];
    if per == 0 {
        return out;
    }
    if n_tokens > 1 {
        out.par_chunks_mut(per)
            .zip(x.par_chunks(cols))
            .for_each(|(o, xi)| f(xi, o));
    } else {
        f(x, &mut out);
    }
    out
}

/// `y[t*rows + r] = Σ_c W[r][c] · x[t*cols + c]` for `t in 0..n_tokens`, on the current rayon pool.
///
/// # Panics
/// If `x.len() != n_tokens * cols` or `y.len() != n_tokens * rows`.
pub fn matmul(w: &QMatrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul_isa(simd_level(), w, x, n_tokens, y)
}

/// [`matmul`] with a chosen instruction set (tests and benchmarks; an unavailable `isa` falls
/// back to scalar).
pub fn matmul_isa(isa: Isa, w: &QMatrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let acts = match Activations::new(x, w.cols, n_tokens) {
        Ok(a) => a,
        Err(e) => panic!("matmul: {e}"),
    };
    matmul_acts_isa(isa, w, &acts, y)
}

/// `y = W · acts` (token-major `n_tokens × rows`), reusing `acts`' quantised forms.
///
/// # Panics
/// If `acts.cols() != w.cols` or `y.len() != n_tokens * rows`.
pub fn matmul_acts(w: &QMatrix, acts: &Activations, y: &mut [f32]) {
    matmul_acts_isa(simd_level(), w, acts, y)
}

/// `ys[i] = ws[i] · x` for several matrices reading the same `x` (q/k/v, gate/up): `x` is
/// quantised once per activation format (Q4_K and Q6_K weights share one Q8_K copy).
///
/// # Panics
/// If the lengths disagree as in [`matmul`], or `ws.len() != ys.len()`.
pub fn matmul_many(ws: &[QMatrix], x: &[f32], n_tokens: usize, ys: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), ys.len(), "matmul_many: one output per matrix");
    let Some(first) = ws.first() else { return };
    let acts = match Activations::new(x, first.cols, n_tokens) {
        Ok(a) => a,
        Err(e) => panic!("matmul_many: {e}"),
    };
    for (w, y) in ws.iter().zip(ys.iter_mut()) {
        matmul_acts(w, &acts, y);
    }
}

/// Rows per parallel task: enough tasks to balance, few enough to keep rayon overhead small.
fn chunk_rows(rows: usize, n_tokens: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let target = rows.div_ceil(threads * 16).max(1);
    let lo = if n_tokens > 1 { 4 } else { 16 };
    target.next_multiple_of(4).clamp(lo, 512)
}

/// [`matmul_acts`] with a chosen instruction set.
pub fn matmul_acts_isa(isa: Isa, w: &QMatrix, acts: &Activations, y: &mut [f32]) {
    assert_eq!(
        acts.cols, w.cols,
        "matmul: activation width != matrix columns"
    );
    let n = acts.n_tokens;
    assert_eq!(
        y.len(),
        n * w.rows,
        "matmul: output length != n_tokens × rows"
    );
    if n == 0 || w.rows == 0 {
        return;
    }
    if w.cols == 0 {
        y.fill(0.0);
        return;
    }
    let isa = if isa.available() { isa } else { Isa::Scalar };
    let src = ActSrc::of(w.dtype, acts);
    let chunk = chunk_rows(w.rows, n);
    let rb = w.row_bytes();
    if n == 1 {
        y.par_chunks_mut(chunk).enumerate().for_each(|(ci, yc)| {
            let r0 = ci * chunk;
            let rows = &w.data[r0 * rb..(r0 + yc.len()) * rb];
            rows_times_tokens(isa, w.dtype, rows, rb, &src, 1, yc);
        });
    } else {
        // Transposed result: yt[r * n + t].
        let mut yt = vec![0f32; y.len()];
        yt.par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(ci, yc)| {
                let r0 = ci * chunk;
                let nr = yc.len() / n;
                let rows = &w.data[r0 * rb..(r0 + nr) * rb];
                rows_times_tokens(isa, w.dtype, rows, rb, &src, n, yc);
            });
        let rows = w.rows;
        y.par_chunks_mut(rows).enumerate().for_each(|(t, yr)| {
            for (r, v) in yr.iter_mut().enumerate() {
                *v = yt[r * n + t];
            }
        });
    }
}

/// One token's activations quantised for one weight dtype, owned (for work that outlives the
/// vector it came from, e.g. a job handed to other threads).
#[derive(Clone, Debug)]
pub enum OwnedAct {
    F32(Vec<f32>),
    Q8(Vec<BlockQ8>),
    Q8K(Vec<BlockQ8K>),
}

impl OwnedAct {
    /// `x` in the format `dtype` weights read (`x.len()` a multiple of that format's block).
    pub fn new(dtype: DType, x: &[f32]) -> OwnedAct {
        match act_format(dtype) {
            ActFormat::F32 => OwnedAct::F32(x.to_vec()),
            ActFormat::Q8 => OwnedAct::Q8(quantize_tokens(x, x.len(), 32, quantize_q8)),
            ActFormat::Q8K => OwnedAct::Q8K(quantize_tokens(x, x.len(), 256, quantize_q8k)),
        }
    }

    pub fn src(&self) -> ActSrc<'_> {
        match self {
            OwnedAct::F32(x) => ActSrc::F32(x),
            OwnedAct::Q8(x) => ActSrc::Q8(x),
            OwnedAct::Q8K(x) => ActSrc::Q8K(x),
        }
    }
}

/// `out[r] = row_r · x` for the rows of `w` in `rows` and one token `x` (in `w`'s activation
/// format), on the calling thread.
///
/// # Panics
/// If the range is out of bounds or `out.len()` differs from its length.
pub fn rows_dot(w: &QMatrix, rows: Range<usize>, x: &ActSrc, out: &mut [f32]) {
    assert_eq!(out.len(), rows.len(), "rows_dot: one output per row");
    if rows.is_empty() {
        return;
    }
    let m = w.rows_slice(rows);
    rows_times_tokens(simd_level(), w.dtype, m.data, m.row_bytes(), x, 1, out);
}

/// One or more tokens' activations in the form a dtype consumes (token-major).
#[derive(Clone, Copy, Debug)]
pub enum ActSrc<'a> {
    F32(&'a [f32]),
    Q8(&'a [BlockQ8]),
    Q8K(&'a [BlockQ8K]),
}

impl<'a> ActSrc<'a> {
    /// `acts` in the format `dtype` weights need (quantising on first use).
    pub fn of(dtype: DType, acts: &'a Activations) -> ActSrc<'a> {
        match act_format(dtype) {
            ActFormat::F32 => ActSrc::F32(acts.f32s()),
            ActFormat::Q8 => ActSrc::Q8(acts.q8()),
            ActFormat::Q8K => ActSrc::Q8K(acts.q8k()),
        }
    }

    /// Token `t` of `n_tokens`.
    ///
    /// # Panics
    /// If `t >= n_tokens`.
    pub fn token(&self, t: usize, n_tokens: usize) -> ActSrc<'a> {
        match *self {
            ActSrc::F32(x) => {
                let per = x.len() / n_tokens;
                ActSrc::F32(&x[t * per..(t + 1) * per])
            }
            ActSrc::Q8(x) => {
                let per = x.len() / n_tokens;
                ActSrc::Q8(&x[t * per..(t + 1) * per])
            }
            ActSrc::Q8K(x) => {
                let per = x.len() / n_tokens;
                ActSrc::Q8K(&x[t * per..(t + 1) * per])
            }
        }
    }
}

/// `out[r * n + t] = row_r · token_t` for the rows in `rows` (`rb` bytes each).
fn rows_times_tokens(
    isa: Isa,
    dtype: DType,
    rows: &[u8],
    rb: usize,
    src: &ActSrc,
    n: usize,
    out: &mut [f32],
) {
    if isa == Isa::Avx512Vnni && dot_vnni::rows_times_tokens(dtype, rows, rb, src, n, out) {
        return;
    }
    if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
        && dot_avx2::rows_times_tokens(dtype, rows, rb, src, n, out)
    {
        return;
    }
    let toks: Vec<ActSrc> = (0..n).map(|t| src.token(t, n)).collect();
    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
        for (tok, v) in toks.iter().zip(o.iter_mut()) {
            *v = match isa {
                Isa::Avx2 | Isa::Avx512Vnni => dot_avx2::dot(dtype, row, tok),
                Isa::Scalar => None,
            }
            .unwrap_or_else(|| dot_scalar::dot(dtype, row, tok));
        }
    }
}

/// Dequantises row `r` of `w` into `out` (`w.cols` floats).
///
/// # Panics
/// If `r >= w.rows` or `out.len() != w.cols`.
pub fn dequantize_row_into(w: &QMatrix, r: usize, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        w.cols,
        "dequantize_row_into: output length != cols"
    );
    dot_scalar::dequantize(w.dtype, w.row(r), out);
}
