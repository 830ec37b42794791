//! The scalar types the CPU reference computes in: f32 (fast, the GPU's precision) and f64
//! (the oracle of the tests). GEMM goes to `matrixmultiply`, a well-kept, dependency-free
//! crate with packed, vectorized f32/f64 kernels and arbitrary strides.

/// A real scalar the reference can compute in.
pub trait Float:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NAME: &'static str;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    /// self·a + b rounded once (a hardware FMA where the code is compiled for one).
    fn mul_add(self, a: Self, b: Self) -> Self;

    /// c ← alpha·a·b + beta·c for `m×k` times `k×n` matrices given by (row stride, column
    /// stride) pairs, which is how transposes are expressed without copying.
    #[allow(clippy::too_many_arguments)]
    fn gemm_strided(
        m: usize, k: usize, n: usize, alpha: Self,
        a: &[Self], a_strides: (isize, isize),
        b: &[Self], b_strides: (isize, isize),
        beta: Self, c: &mut [Self], c_row_stride: isize,
    );
}

macro_rules! impl_float {
    ($t:ty, $name:literal, $gemm:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NAME: &'static str = $name;
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_f64(self) -> f64 { self as f64 }
            fn exp(self) -> Self { <$t>::exp(self) }
            fn ln(self) -> Self { <$t>::ln(self) }
            fn sqrt(self) -> Self { <$t>::sqrt(self) }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self { <$t>::mul_add(self, a, b) }
            fn gemm_strided(
                m: usize, k: usize, n: usize, alpha: Self,
                a: &[Self], a_strides: (isize, isize),
                b: &[Self], b_strides: (isize, isize),
                beta: Self, c: &mut [Self], c_row_stride: isize,
            ) {
                let extent = |rows: usize, cols: usize, (rs, cs): (isize, isize)| {
                    if rows == 0 || cols == 0 { 0 } else {
                        (rows as isize - 1) * rs + (cols as isize - 1) * cs + 1
                    }
                };
                // The slices must cover every element the strides reach: checked here so the
                // unsafe call below only ever reads and writes inside them.
                assert!(a.len() as isize >= extent(m, k, a_strides), "gemm: a too short");
                assert!(b.len() as isize >= extent(k, n, b_strides), "gemm: b too short");
                assert!(c.len() as isize >= extent(m, n, (c_row_stride, 1)), "gemm: c too short");
                // SAFETY: the asserts above bound every index the strides reach inside each
                // slice; `c` is a unique borrow, so it does not alias `a` or `b`.
                unsafe {
                    $gemm(
                        m, k, n, alpha,
                        a.as_ptr(), a_strides.0, a_strides.1,
                        b.as_ptr(), b_strides.0, b_strides.1,
                        beta, c.as_mut_ptr(), c_row_stride, 1,
                    )
                }
            }
        }
    };
}

impl_float!(f32, "f32", matrixmultiply::sgemm);
impl_float!(f64, "f64", matrixmultiply::dgemm);
