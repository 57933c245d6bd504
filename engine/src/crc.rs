//! CRC-32C of a concatenation from the CRCs of its parts, in O(log n) word operations.
//!
//! `crc32c::crc32c_combine` builds 32x32 bit-matrix operators by repeated squaring on every
//! call (tens of thousands of operations, a visible share of the append path). Here the
//! operators for 2^k zero bytes are polynomials x^(8*2^k) mod P, computed once at compile time,
//! and appending n zero bytes to a CRC is one polynomial multiplication per set bit of n.

/// CRC-32C (Castagnoli) polynomial, bit-reflected: bit 31 stands for x^0, bit 0 for x^31.
const POLY: u32 = 0x82F6_3B78;
/// x^0 in the reflected representation.
const ONE: u32 = 1 << 31;

/// `a * b mod P` over GF(2), both reflected.
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = ONE;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        // b *= x: a reflected shift right; x^32 folds back as the polynomial's low terms.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// `X_POW_2K[k]` = x^(2^k) mod P.
const X_POW_2K: [u32; 64] = {
    let mut table = [0u32; 64];
    table[0] = ONE >> 1; // x^1
    let mut k = 1;
    while k < 64 {
        table[k] = mul_mod_p(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// x^(8 * bytes) mod P: the operator that appends `bytes` zero bytes to a CRC register.
fn x_pow_8n(bytes: u64) -> u32 {
    // Multiplying by 8 is a shift of the exponent's bits into table indexes 3 and up.
    let mut n = bytes;
    let mut k = 3;
    let mut result = ONE;
    while n != 0 {
        if n & 1 != 0 {
            result = mul_mod_p(X_POW_2K[k], result);
        }
        n >>= 1;
        k += 1;
    }
    result
}

/// The CRC-32C of `a ++ b` from `crc_a`, `crc_b` and the length of `b`.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    // The pre- and post-inversion of both CRCs cancel out: what is left is crc_a carried
    // over len_b zero bytes, plus crc_b.
    mul_mod_p(x_pow_8n(len_b as u64), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_crate_and_the_direct_crc() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for split in [0, 1, 7, 21, 4096, 65_537, 199_999, 200_000] {
            let (a, b) = data.split_at(split);
            let (ca, cb) = (crc32c::crc32c(a), crc32c::crc32c(b));
            assert_eq!(
                combine(ca, cb, b.len()),
                crc32c::crc32c(&data),
                "split {split}"
            );
            assert_eq!(
                combine(ca, cb, b.len()),
                crc32c::crc32c_combine(ca, cb, b.len())
            );
        }
    }

    proptest! {
        #[test]
        fn any_split_of_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..3000),
                                  at in any::<prop::sample::Index>()) {
            let split = at.index(data.len() + 1);
            let (a, b) = data.split_at(split);
            prop_assert_eq!(
                combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                crc32c::crc32c(&data)
            );
        }
    }
}
