//! Read plans: which reads to issue for a set of wanted byte ranges.
//!
//! The input is a list of [`Piece`]s: `len` bytes at `off` of a file, to land at `dst_off` of
//! request `req`'s destination. For direct I/O every read must start and end on the file's
//! `O_DIRECT` offset alignment `A` and land at an address aligned to its memory alignment `M`.
//! Two kinds of reads come out:
//!
//! - **to-destination** reads: the aligned interior `[align_up(off), align_down(end))` of a piece,
//!   read straight into the destination, when that interior is large (≥ `min_dest_direct`) and
//!   lands at an `M`-aligned address (destinations are page aligned, so this holds when
//!   `(dst_off + align_up(off) - off) % M == 0`). No copy at all. Split into reads of at most
//!   `chunk` bytes.
//! - **bounce** reads: everything else (heads and tails of pieces that share a sector with
//!   their neighbours, small tensors, pieces whose alignment does not line up). These needs are
//!   sorted, widened to `A`, and merged greedily into reads of at most `bounce` bytes, reading
//!   through gaps of up to `merge_gap` bytes; each read carries the list of [`Delivery`]s to
//!   copy out of it. A read that runs past the end of the file (aligned superset of the last
//!   tensor) expects fewer bytes: `expect`.
//!
//! Needs are first cut at multiples of `bounce` (a multiple of `A`), so a need widened to `A`
//! always fits one bounce buffer. Overlapping requests are allowed: each request's bytes are
//! delivered separately, at the cost of reading the overlap twice.
//! The reads are finally sorted by file and offset so the device sees a mostly sequential stream.

use crate::probe::DioAlign;

/// Wanted bytes: `len` bytes at `off` of `files[file]` into request `req` at `dst_off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub req: usize,
    pub file: usize,
    pub off: u64,
    pub len: usize,
    pub dst_off: usize,
}

/// Copy `len` bytes from `src_off` of a bounce buffer to `dst_off` of request `req`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub req: usize,
    pub dst_off: usize,
    pub src_off: usize,
    pub len: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Read straight into request `req` at `dst_off`.
    Dest { req: usize, dst_off: usize },
    /// Read into a bounce buffer, then copy out.
    Bounce(Vec<Delivery>),
}

/// One read: `len` bytes at `offset` (both aligned for direct I/O); `expect` ≤ `len` bytes are
/// in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReadOp {
    pub file: usize,
    pub offset: u64,
    pub len: usize,
    pub expect: usize,
    pub target: Target,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct FileGeom {
    pub size: u64,
    pub align: DioAlign,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanParams {
    pub chunk: usize,
    pub bounce: usize,
    pub merge_gap: u64,
    pub min_dest_direct: usize,
}

fn up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// Direct-I/O reads covering every piece. `chunk` and `bounce` must be multiples of every
/// file's offset alignment (the loader rounds them).
pub(crate) fn direct_plan(pieces: &[Piece], geom: &[FileGeom], p: &PlanParams) -> Vec<ReadOp> {
    let mut ops = Vec::new();
    let mut needs = Vec::new();
    for pc in pieces.iter().filter(|pc| pc.len > 0) {
        let Some(g) = geom.get(pc.file) else { continue };
        let a = g.align.offset as u64;
        let m = g.align.mem as u64;
        let end = pc.off + pc.len as u64;
        let (a0, a1) = (up(pc.off, a), down(end, a));
        let dest_ok = a1 > a0
            && (a1 - a0) as usize >= p.min_dest_direct
            && m <= crate::aligned::BUF_ALIGN as u64
            && (pc.dst_off as u64 + (a0 - pc.off)).is_multiple_of(m);
        if !dest_ok {
            needs.push(*pc);
            continue;
        }
        if a0 > pc.off {
            needs.push(Piece {
                len: (a0 - pc.off) as usize,
                ..*pc
            });
        }
        if end > a1 {
            needs.push(Piece {
                off: a1,
                len: (end - a1) as usize,
                dst_off: pc.dst_off + (a1 - pc.off) as usize,
                ..*pc
            });
        }
        let mut s = a0;
        while s < a1 {
            let n = (p.chunk as u64).min(a1 - s);
            ops.push(ReadOp {
                file: pc.file,
                offset: s,
                len: n as usize,
                expect: n as usize,
                target: Target::Dest {
                    req: pc.req,
                    dst_off: pc.dst_off + (s - pc.off) as usize,
                },
            });
            s += n;
        }
    }
    // Cut needs at multiples of the bounce size so each fits one buffer once widened.
    let b = p.bounce as u64;
    let mut cut = Vec::with_capacity(needs.len());
    for n in needs {
        let mut off = n.off;
        let end = n.off + n.len as u64;
        while off < end {
            let e = end.min(down(off, b) + b);
            cut.push(Piece {
                off,
                len: (e - off) as usize,
                dst_off: n.dst_off + (off - n.off) as usize,
                ..n
            });
            off = e;
        }
    }
    cut.sort_by_key(|n| (n.file, n.off));
    let mut cur: Option<(usize, u64, u64, Vec<Delivery>)> = None;
    let flush = |c: (usize, u64, u64, Vec<Delivery>), ops: &mut Vec<ReadOp>| {
        let (file, rs, re, dl) = c;
        let size = geom.get(file).map_or(0, |g| g.size);
        ops.push(ReadOp {
            file,
            offset: rs,
            len: (re - rs) as usize,
            expect: (re.min(size).saturating_sub(rs)) as usize,
            target: Target::Bounce(dl),
        });
    };
    for n in cut {
        let Some(g) = geom.get(n.file) else { continue };
        let a = g.align.offset as u64;
        let (s, e) = (down(n.off, a), up(n.off + n.len as u64, a));
        let fits = match &cur {
            Some((f, rs, re, _)) => *f == n.file && s <= *re + p.merge_gap && e.max(*re) - rs <= b,
            None => false,
        };
        if !fits {
            if let Some(c) = cur.take() {
                flush(c, &mut ops);
            }
            cur = Some((n.file, s, e, Vec::new()));
        }
        if let Some((_, rs, re, dl)) = cur.as_mut() {
            *re = (*re).max(e);
            dl.push(Delivery {
                req: n.req,
                dst_off: n.dst_off,
                src_off: (n.off - *rs) as usize,
                len: n.len,
            });
        }
    }
    if let Some(c) = cur.take() {
        flush(c, &mut ops);
    }
    ops.sort_by_key(|o| (o.file, o.offset));
    ops
}

/// Pieces cut to at most `chunk` bytes (for the buffered readers).
pub(crate) fn split(pieces: &[Piece], chunk: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    for pc in pieces {
        let mut s = 0;
        while s < pc.len {
            let n = chunk.min(pc.len - s);
            out.push(Piece {
                off: pc.off + s as u64,
                len: n,
                dst_off: pc.dst_off + s,
                ..*pc
            });
            s += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Replays a plan on a fake file whose byte at `o` is `o mod 251` and checks every request
    /// byte is delivered exactly once with the right value, and every read is aligned.
    #[test]
    fn plans_cover_exactly_and_align() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for case in 0..300 {
            let a = [512usize, 4096][case % 2];
            let m = [4usize, 512, 4096][case % 3];
            let size = rng.random_range(1..3_000_000u64);
            let geom = [FileGeom {
                size,
                align: DioAlign {
                    offset: a,
                    mem: m,
                    reported: true,
                },
            }];
            let mut pieces = Vec::new();
            for req in 0..rng.random_range(1..40) {
                let off = rng.random_range(0..size);
                let len = match rng.random_range(0..4) {
                    0 => rng.random_range(0..5),
                    1 => rng.random_range(0..10_000),
                    _ => rng.random_range(0..=(size - off) as usize),
                }
                .min((size - off) as usize);
                pieces.push(Piece {
                    req,
                    file: 0,
                    off,
                    len,
                    dst_off: 0,
                });
            }
            let p = PlanParams {
                chunk: 64 << 10,
                bounce: 32 << 10,
                merge_gap: rng.random_range(0..20_000),
                min_dest_direct: [0, 8192][case % 2],
            };
            let ops = direct_plan(&pieces, &geom, &p);
            let mut got: Vec<Vec<i32>> = pieces.iter().map(|pc| vec![-1; pc.len]).collect();
            for op in &ops {
                assert_eq!(op.offset % a as u64, 0);
                assert_eq!(op.len % a, 0);
                assert!(op.expect <= op.len);
                assert_eq!(
                    op.expect as u64,
                    (op.offset + op.len as u64).min(size) - op.offset
                );
                let byte = |o: u64| (o % 251) as i32;
                match &op.target {
                    Target::Dest { req, dst_off } => {
                        assert!(op.len <= p.chunk);
                        assert_eq!((dst_off % m), 0);
                        for i in 0..op.len {
                            let slot = &mut got[*req][dst_off + i];
                            assert_eq!(*slot, -1, "delivered twice");
                            *slot = byte(op.offset + i as u64);
                        }
                    }
                    Target::Bounce(dl) => {
                        assert!(op.len <= p.bounce);
                        for d in dl {
                            assert!(d.src_off + d.len <= op.expect);
                            for i in 0..d.len {
                                let slot = &mut got[d.req][d.dst_off + i];
                                assert_eq!(*slot, -1, "delivered twice");
                                *slot = byte(op.offset + (d.src_off + i) as u64);
                            }
                        }
                    }
                }
            }
            for (pc, g) in pieces.iter().zip(&got) {
                for (i, v) in g.iter().enumerate() {
                    assert_eq!(*v, ((pc.off + i as u64) % 251) as i32, "case {case}");
                }
            }
        }
    }

    #[test]
    fn aligned_interiors_go_straight_to_destination() {
        let geom = [FileGeom {
            size: 100 << 20,
            align: DioAlign {
                offset: 512,
                mem: 512,
                reported: true,
            },
        }];
        let p = PlanParams {
            chunk: 8 << 20,
            bounce: 8 << 20,
            merge_gap: 0,
            min_dest_direct: 1 << 20,
        };
        // 20 MiB tensor at a 512-aligned offset: three reads to destination, no bounce.
        let pc = Piece {
            req: 0,
            file: 0,
            off: 1024,
            len: 20 << 20,
            dst_off: 0,
        };
        let ops = direct_plan(&[pc], &geom, &p);
        assert_eq!(ops.len(), 3);
        assert!(ops.iter().all(|o| matches!(o.target, Target::Dest { .. })));
        // Misaligned by 32: everything bounces (the interior would land at a 480-byte offset).
        let ops = direct_plan(&[Piece { off: 1056, ..pc }], &geom, &p);
        assert!(ops.iter().all(|o| matches!(o.target, Target::Bounce(_))));
    }
}
