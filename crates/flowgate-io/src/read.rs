//! [`read_ranges`]: parallel positional reads of byte ranges into aligned buffers.
//!
//! Work is split into pieces of at most [`PIECE`] bytes so that large tensors are read by
//! several threads at once and small ones do not serialise behind a big one. Each piece is a
//! loop of `pread` calls (short reads are continued, `EINTR` retried); a read that hits end of
//! file before the range is complete is an error naming the file and range, never a silently
//! zero-filled tensor.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::AlignedBuf;

/// Largest single read.
pub const PIECE: usize = 8 << 20;

/// One range to read: `len` bytes at `offset` of `files[file]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub file: usize,
    pub offset: u64,
    pub len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: reading {len} bytes at offset {offset}: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected end of file reading {len} bytes at offset {offset}")]
    ShortFile {
        path: PathBuf,
        offset: u64,
        len: usize,
    },
    #[error("request names file #{0}, which is not in the file list")]
    BadFile(usize),
    #[error("cannot allocate {0} bytes")]
    Alloc(usize),
}

/// Reads every request into its own [`AlignedBuf`], using `threads` reader threads.
pub fn read_ranges(
    files: &[PathBuf],
    requests: &[ReadRequest],
    threads: usize,
) -> Result<Vec<AlignedBuf>, IoError> {
    let handles = files
        .iter()
        .map(|p| {
            File::open(p).map_err(|source| IoError::Open {
                path: p.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut bufs = Vec::with_capacity(requests.len());
    for r in requests {
        if r.file >= files.len() {
            return Err(IoError::BadFile(r.file));
        }
        bufs.push(AlignedBuf::zeroed(r.len).ok_or(IoError::Alloc(r.len))?);
    }
    // Pieces: (request index, start within request, length).
    let mut pieces = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let mut start = 0;
        while start < r.len {
            let n = PIECE.min(r.len - start);
            pieces.push((i, start, n));
            start += n;
        }
    }
    // Hand each thread disjoint mutable slices: split every buffer into its pieces up front.
    let mut slots: Vec<(usize, u64, &mut [u8])> = Vec::with_capacity(pieces.len());
    {
        let mut rest: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        for &(i, start, n) in &pieces {
            let buf = std::mem::take(&mut rest[i]);
            let (head, tail) = buf.split_at_mut(n);
            rest[i] = tail;
            slots.push((requests[i].file, requests[i].offset + start as u64, head));
        }
    }
    let slots = Mutex::new(slots.into_iter().map(Some).collect::<Vec<_>>());
    let next = AtomicUsize::new(0);
    let threads = threads.max(1);
    let n_pieces = pieces.len();
    let first_err: Mutex<Option<IoError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(n_pieces.max(1)) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n_pieces {
                    break;
                }
                let slot = slots.lock().ok().and_then(|mut v| v[k].take());
                let Some((file, offset, dst)) = slot else {
                    break;
                };
                if let Err(e) = read_full(&handles[file], &files[file], offset, dst) {
                    if let Ok(mut g) = first_err.lock() {
                        g.get_or_insert(e);
                    }
                    break;
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(bufs)
}

fn read_full(f: &File, path: &std::path::Path, offset: u64, dst: &mut [u8]) -> Result<(), IoError> {
    let len = dst.len();
    let mut done = 0;
    while done < len {
        match f.read_at(&mut dst[done..], offset + done as u64) {
            Ok(0) => {
                return Err(IoError::ShortFile {
                    path: path.to_path_buf(),
                    offset,
                    len,
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(IoError::Read {
                    path: path.to_path_buf(),
                    offset,
                    len,
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Write;

    #[test]
    fn reads_match_file_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let data: Vec<u8> = (0..(PIECE * 2 + 12_345)).map(|_| rng.random()).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        let files = vec![f.path().to_path_buf()];
        let reqs = vec![
            ReadRequest { file: 0, offset: 0, len: 1 },
            ReadRequest { file: 0, offset: 3, len: PIECE * 2 + 100 },
            ReadRequest { file: 0, offset: 4095, len: 4097 },
            ReadRequest { file: 0, offset: (data.len() - 5) as u64, len: 5 },
            ReadRequest { file: 0, offset: 17, len: 0 },
        ];
        for threads in [1, 3] {
            let bufs = read_ranges(&files, &reqs, threads).unwrap();
            for (r, b) in reqs.iter().zip(&bufs) {
                let o = r.offset as usize;
                assert_eq!(&b[..], &data[o..o + r.len]);
            }
        }
    }

    #[test]
    fn past_end_is_an_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1u8; 100]).unwrap();
        let files = vec![f.path().to_path_buf()];
        let e = read_ranges(&files, &[ReadRequest { file: 0, offset: 90, len: 20 }], 2)
            .unwrap_err();
        assert!(matches!(e, IoError::ShortFile { .. }), "{e}");
        let e = read_ranges(&files, &[ReadRequest { file: 1, offset: 0, len: 1 }], 2)
            .unwrap_err();
        assert!(matches!(e, IoError::BadFile(1)));
    }
}
