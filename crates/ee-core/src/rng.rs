//! Small, version-stable random helpers shared by key derivation and sampling.

use rand_core::RngCore;

/// A uniform draw in `0..bound` by rejection (no modulo bias). `bound > 0`.
pub fn uniform_below<R: RngCore + ?Sized>(rng: &mut R, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % bound;
        }
    }
}

/// 256 bits from the OS CSPRNG.
pub fn os_random_bytes() -> Result<[u8; 32], crate::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| crate::Error::Key(format!("OS random source failed: {e}")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn draws_stay_below_bound_and_cover_it() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let x = uniform_below(&mut rng, 5);
            seen[x as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
