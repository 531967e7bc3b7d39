//! [`read_ranges`]: the entry point the engine uses: byte ranges in, one aligned buffer per
//! range out, with the best strategy ([`crate::Loader`] with default options: page-cache probe,
//! io_uring + `O_DIRECT` for what is not cached, `pread` threads for what is).
//!
//! A read that hits end of file before the range is complete is an error naming the file and
//! range, never a silently zero-filled tensor.

use std::path::PathBuf;

use crate::{AlignedBuf, Loader, LoaderOptions};

/// Largest single read (the default [`LoaderOptions::chunk`]).
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
    #[error("{path}: verification failed for {len} bytes at offset {offset}: first difference at byte {at} of the file")]
    Verify {
        path: PathBuf,
        offset: u64,
        len: usize,
        at: u64,
    },
    #[error("I/O engine: {0}")]
    Engine(String),
    #[error("internal read-plan error: {0}")]
    Plan(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Reads every request into its own [`AlignedBuf`]; `threads` is the number of threads reading
/// through the page cache (direct reads are asynchronous and need no threads of their own).
pub fn read_ranges(
    files: &[PathBuf],
    requests: &[ReadRequest],
    threads: usize,
) -> Result<Vec<AlignedBuf>, IoError> {
    Loader::new(LoaderOptions {
        threads: threads.max(1),
        ..LoaderOptions::default()
    })
    .read(files, requests)
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
            ReadRequest {
                file: 0,
                offset: 0,
                len: 1,
            },
            ReadRequest {
                file: 0,
                offset: 3,
                len: PIECE * 2 + 100,
            },
            ReadRequest {
                file: 0,
                offset: 4095,
                len: 4097,
            },
            ReadRequest {
                file: 0,
                offset: (data.len() - 5) as u64,
                len: 5,
            },
            ReadRequest {
                file: 0,
                offset: 17,
                len: 0,
            },
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
        let e = read_ranges(
            &files,
            &[ReadRequest {
                file: 0,
                offset: 90,
                len: 20,
            }],
            2,
        )
        .unwrap_err();
        assert!(matches!(e, IoError::ShortFile { .. }), "{e}");
        let e = read_ranges(
            &files,
            &[ReadRequest {
                file: 1,
                offset: 0,
                len: 1,
            }],
            2,
        )
        .unwrap_err();
        assert!(matches!(e, IoError::BadFile(1)));
    }
}
