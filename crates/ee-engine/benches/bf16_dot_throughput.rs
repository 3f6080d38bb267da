//! Why the BF16 kernel widens weights to f32 rather than using AVX-512
//! BF16's `vdpbf16ps` (`crate::float`'s docs): multiply-adds per
//! nanosecond of that instruction against f32 `vfmadd231ps`, both on
//! 512-bit registers, sixteen independent accumulators, one run. On the
//! 2-core Xeon VM of 2026-11-30 it gave 0.57 ns against 0.20 ns per
//! instruction: 56 against 80 multiply-adds per ns, so the instruction
//! does less than the f32 path (a build with it, bit-exact across its
//! builds, ran SmolLM2's BF16 prefill of 512 tokens at 569 tok/s against
//! 711 in the same run). A benchmark, not a test:
//!
//! ```text
//! cargo bench -p ee-engine --bench bf16_dot_throughput
//! ```

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    const ACCUMULATORS: usize = 16;

    /// `n` rounds of one instruction into each accumulator; their sum.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dpbf16(n: usize) -> f32 {
        // Pairs of bf16 ones: each instruction adds 2 to every lane.
        let ones = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3F80_3F80));
        let (a, b) = (black_box(ones), black_box(ones));
        let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fmadd(n: usize) -> f32 {
        let (a, b) = (
            black_box(_mm512_set1_ps(1.0)),
            black_box(_mm512_set1_ps(1.0)),
        );
        let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(a, b, *v);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    /// Nanoseconds per instruction, the best of three.
    fn time(f: impl Fn(usize) -> f32) -> f64 {
        let n = 10_000_000;
        (0..3)
            .map(|_| {
                let start = Instant::now();
                black_box(f(n));
                start.elapsed().as_secs_f64() * 1e9 / (n * ACCUMULATORS) as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    pub fn run() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            println!("this CPU has no AVX-512 BF16");
            return;
        }
        // SAFETY: the features were detected above.
        let dot = time(|n| unsafe { dpbf16(n) });
        let fma = time(|n| unsafe { fmadd(n) });
        println!("instruction   ns/instr  multiply-adds/ns");
        println!("vdpbf16ps     {dot:8.3}  {:16.1}", 32.0 / dot);
        println!("vfmadd231ps   {fma:8.3}  {:16.1}", 16.0 / fma);
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86_64 only");
}
