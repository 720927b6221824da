//! Subnormal floats flushed to zero, per thread.
//!
//! On x86 a float operation with a subnormal operand or result (magnitude below
//! 2^-126, about 1.2e-38) takes a microcode assist, tens to hundreds of times the
//! cost of a normal one, and matrix kernels slow down with it. A policy that has
//! become nearly deterministic on its data makes such values: the probabilities of
//! the actions it no longer takes (`exp` of a log-probability below about -87), and
//! the gradients that pass through them. Flushing them to zero changes nothing a
//! loss can see and keeps the kernels at full speed (PyTorch's
//! `torch.set_flush_denormal(True)` does the same).

/// Flush-to-zero and denormals-are-zero for the calling thread's float math (x86-64:
/// MXCSR's FTZ and DAZ bits; aarch64: FPCR's FZ bit). Threads the caller starts
/// afterwards inherit the setting; threads that exist already keep theirs.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr and ldmxcsr read and write the calling thread's float
        // control register only, through a valid pointer to a local.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
            csr |= FTZ_DAZ;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        const FZ: u64 = 1 << 24;
        let mut fpcr: u64;
        // SAFETY: reads and writes the calling thread's float control register only.
        unsafe {
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
            fpcr |= FZ;
            std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
        }
    }
}

// The two architectures libtorch's CPU builds run on; elsewhere the call does nothing.
#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;
    use std::hint::black_box;

    /// A product whose exact value is subnormal (2^-130).
    fn subnormal_product() -> f32 {
        black_box(f32::MIN_POSITIVE) * black_box(1.0 / 16.0)
    }

    #[test]
    fn subnormal_results_become_zero_on_the_thread_that_asks_and_its_children() {
        // A thread of its own, so the test's runner threads keep their settings.
        std::thread::spawn(|| {
            assert!(subnormal_product() > 0.0, "subnormals are kept by default");
            flush_denormals();
            assert_eq!(subnormal_product(), 0.0);
            // A subnormal operand counts as zero too (denormals-are-zero).
            let tiny = black_box(f32::from_bits(1)); // the smallest subnormal
            assert_eq!(tiny * black_box(2.0f32.powi(30)), 0.0);
            // Normal values are untouched.
            assert_eq!(black_box(1.5f32) * black_box(2.0), 3.0);
            let child = std::thread::spawn(subnormal_product).join().unwrap();
            assert_eq!(child, 0.0, "a thread started afterwards inherits it");
        })
        .join()
        .unwrap();
        let other = std::thread::spawn(subnormal_product).join().unwrap();
        assert!(other > 0.0, "other threads keep theirs");
    }
}
