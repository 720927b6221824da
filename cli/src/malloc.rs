//! glibc malloc settings for a process that trains or acts with libtorch.
//!
//! libtorch allocates every intermediate tensor afresh. With glibc's defaults, a freed
//! tensor of a few MiB is often given back to the kernel (heap trimming, or `munmap`
//! for blocks above the adaptive mmap threshold), and the next update takes page faults
//! to touch the same amount of memory again: about a tenth of the NetHack learner's CPU
//! time went to the kernel's page-fault path. Keeping freed memory in the process
//! removes that work; the resident size stays near its peak, which for a learner or an
//! actor is its steady state anyway.
//!
//! Rust's own allocations come from mimalloc (see `main.rs`), which by default gives
//! freed memory back to the kernel a second after it was freed; the slowest loads of
//! `spur bench broadcast` (megabytes of weight buffers freed and allocated again
//! every few tens of milliseconds) were then a fifth slower than with glibc, and as
//! fast when mimalloc never gives memory back. It keeps freed memory too.
//!
//! A user who sets glibc's own variables (`MALLOC_MMAP_THRESHOLD_`,
//! `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`) or mimalloc's `MIMALLOC_PURGE_DELAY`
//! keeps them, and `SPUR_MALLOC=default` leaves both allocators' defaults alone.

/// Blocks up to this size come from the heap, not from their own mapping (the
/// ceiling of glibc's own adaptive threshold on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of a heap is given back only beyond this.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;
/// Extra memory asked of the kernel each time a heap grows.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 64 << 20;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the enum's 16th value; the
/// crate has no name for it). A test checks that it reads as that option's default.
const MI_OPTION_PURGE_DELAY: libc::c_int = 15;

extern "C" {
    fn mi_option_set(option: libc::c_int, value: libc::c_long);
    #[cfg(test)]
    fn mi_option_get(option: libc::c_int) -> libc::c_long;
}

/// Applies the settings unless the environment says otherwise; a setting glibc
/// refuses is logged.
pub fn keep_freed_memory() {
    if std::env::var("SPUR_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options; -1 means never give memory back.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let own = [
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_TOP_PAD_",
    ];
    if own.iter().any(|k| std::env::var_os(k).is_some()) {
        return;
    }
    if !tune() {
        tracing::warn!("glibc refused a malloc setting; freed memory may go back to the kernel");
    }
}

/// Sets the three values; true when glibc took every one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (libc::M_TOP_PAD, TOP_PAD),
    ]
    .into_iter()
    // SAFETY: mallopt only changes allocator parameters (1 means it took the value).
    .all(|(param, value)| unsafe { libc::mallopt(param, value) } == 1)
}

/// Other allocators keep their own policies: nothing to set, nothing refused.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    true
}

#[cfg(test)]
mod mimalloc_tests {
    /// The option index names mimalloc's purge delay: in a process that has not
    /// changed it, it reads as that option's default in mimalloc 3.3 (1000 ms; no
    /// other option of that version defaults to 1000).
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one of mimalloc's options.
        let delay = unsafe { super::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// This thread's minor page faults so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Writes a byte into every page of the block (volatile: a store right before
    /// `free` would otherwise be optimized away).
    ///
    /// # Safety
    /// `block` must point to `bytes` writable bytes.
    unsafe fn touch(block: *mut u8, bytes: usize) {
        for at in (0..bytes).step_by(4096) {
            std::ptr::write_volatile(block.add(at), 1);
        }
    }

    /// Page faults taken while touching `bytes` allocated right after a block of the
    /// same size was touched and freed.
    fn faults_on_reuse(bytes: usize) -> i64 {
        // SAFETY: each block is touched within its size, then freed once.
        unsafe {
            let first = libc::malloc(bytes).cast::<u8>();
            touch(first, bytes);
            libc::free(first.cast());
            let before = minor_faults();
            let second = libc::malloc(bytes).cast::<u8>();
            touch(second, bytes);
            let faults = minor_faults() - before;
            libc::free(second.cast());
            faults
        }
    }

    /// A freed 16 MiB tensor's memory is used again without faulting its pages in
    /// again (with glibc's defaults such a block is mapped and unmapped each time:
    /// about 4096 faults).
    #[test]
    fn freed_memory_is_reused_without_page_faults() {
        assert!(super::tune(), "glibc took every setting");
        let bytes = 16 << 20;
        let faults = faults_on_reuse(bytes);
        assert!(faults < (bytes / 4096 / 10) as i64, "{faults} page faults");
    }
}
