//! Brute force: the key-space bound the published scheme argues from.
//! log2(V!) bits for a vocabulary of V. It is not a measure of security:
//! letter substitution has 26! ≈ 2^88 keys and is solved by hand, because
//! an attacker never enumerates keys; the other attacks here never do.

/// log2(n!), summed exactly enough for any vocabulary (error well under a
/// bit for n up to millions).
pub fn log2_factorial(n: u64) -> f64 {
    (2..=n).map(|k| (k as f64).log2()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_values() {
        assert_eq!(log2_factorial(1), 0.0);
        assert!((log2_factorial(26) - 88.38).abs() < 0.01);
        // Llama 3's 128,256 tokens: about 1.99 million bits, as the threat
        // model says.
        let llama3 = log2_factorial(128_256);
        assert!((1.98e6..2.0e6).contains(&llama3), "{llama3}");
    }
}
