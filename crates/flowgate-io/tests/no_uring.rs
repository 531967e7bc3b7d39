//! The automatic fallback when io_uring cannot be set up (ENOSYS on old kernels, EPERM under
//! seccomp or `kernel.io_uring_disabled`): simulated with `FLOWGATE_NO_IO_URING`, in a test
//! binary of its own because the variable is process-wide.

use std::io::Write;

use flowgate_io::probe::evict;
use flowgate_io::{Loader, LoaderOptions, ReadRequest, Strategy};
use rand::{Rng, SeedableRng};

#[test]
fn direct_reads_fall_back_to_a_pread_pool() {
    std::env::set_var("FLOWGATE_NO_IO_URING", "1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut data = vec![0u8; (5 << 20) + 333];
    rng.fill(&mut data[..]);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    evict(f.path()).unwrap();
    let files = vec![f.path().to_path_buf()];
    let reqs: Vec<ReadRequest> = [(0u64, 1usize), (77, 3 << 20), (4096, 8192), (5 << 20, 333)]
        .iter()
        .map(|&(offset, len)| ReadRequest {
            file: 0,
            offset,
            len,
        })
        .collect();
    for strategy in [Strategy::Auto, Strategy::Direct] {
        let (bufs, st) = Loader::new(LoaderOptions {
            strategy,
            ..LoaderOptions::default()
        })
        .read_with_stats(&files, &reqs)
        .unwrap();
        for (r, b) in reqs.iter().zip(&bufs) {
            let o = r.offset as usize;
            assert_eq!(&b[..], &data[o..o + r.len]);
        }
        assert_eq!(st.engine, "pread pool", "{st:?}");
        assert!(
            st.notes.iter().any(|n| n.contains("io_uring unavailable")),
            "{:?}",
            st.notes
        );
    }
}
