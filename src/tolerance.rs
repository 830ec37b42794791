//! The one numeric comparison used everywhere (tests, GPU-vs-CPU checks, the CLI's self
//! checks): element i passes when |actual_i − expected_i| ≤ atol + rtol·|expected_i|.
//! On failure it names the worst element (the largest excess over its bound), its index,
//! both values, and how many elements failed.

use std::fmt;

/// Absolute and relative tolerance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub const fn new(atol: f64, rtol: f64) -> Self {
        Tolerance { atol, rtol }
    }
}

/// Why two sequences are not close.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    pub what: String,
    pub index: usize,
    pub actual: f64,
    pub expected: f64,
    pub bound: f64,
    pub failures: usize,
    pub len: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.index == usize::MAX {
            return write!(f, "{}: lengths differ (actual {}, expected {})", self.what, self.failures, self.len);
        }
        write!(
            f,
            "{}: {} of {} elements out of tolerance; worst at index {}: actual {:e}, expected {:e}, |diff| {:e} > bound {:e}",
            self.what, self.failures, self.len, self.index, self.actual, self.expected,
            (self.actual - self.expected).abs(), self.bound
        )
    }
}

impl std::error::Error for Mismatch {}

/// Compares `actual` with `expected` element by element. NaN never passes; equal infinities do.
pub fn check_close<A, E>(what: &str, actual: A, expected: E, tol: Tolerance) -> Result<(), Mismatch>
where
    A: IntoIterator,
    A::Item: Into<f64>,
    E: IntoIterator,
    E::Item: Into<f64>,
{
    let actual: Vec<f64> = actual.into_iter().map(Into::into).collect();
    let expected: Vec<f64> = expected.into_iter().map(Into::into).collect();
    if actual.len() != expected.len() {
        return Err(Mismatch { what: what.into(), index: usize::MAX, actual: f64::NAN, expected: f64::NAN, bound: 0.0, failures: actual.len(), len: expected.len() });
    }
    let mut worst: Option<(usize, f64)> = None;
    let mut failures = 0;
    for (i, (&a, &e)) in actual.iter().zip(&expected).enumerate() {
        let bound = tol.atol + tol.rtol * e.abs();
        let excess = if a == e { 0.0 } else if a.is_nan() || e.is_nan() { f64::INFINITY } else { (a - e).abs() - bound };
        if excess > 0.0 || excess.is_nan() {
            failures += 1;
            if worst.is_none_or(|(_, w)| excess > w) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((index, _)) => Err(Mismatch {
            what: what.into(),
            index,
            actual: actual[index],
            expected: expected[index],
            bound: tol.atol + tol.rtol * expected[index].abs(),
            failures,
            len: actual.len(),
        }),
    }
}

/// [`check_close`] that panics with the mismatch report: for tests.
#[track_caller]
pub fn assert_close<A, E>(what: &str, actual: A, expected: E, tol: Tolerance)
where
    A: IntoIterator,
    A::Item: Into<f64>,
    E: IntoIterator,
    E::Item: Into<f64>,
{
    if let Err(m) = check_close(what, actual, expected, tol) {
        panic!("{m}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_worst_element() {
        let tol = Tolerance::new(1e-3, 0.0);
        let err = check_close("x", [1.0, 2.0, 3.0], [1.0, 2.1, 3.5], tol).unwrap_err();
        assert_eq!(err.index, 2);
        assert_eq!(err.failures, 2);
        assert!(err.to_string().contains("worst at index 2"), "{err}");
    }

    #[test]
    fn relative_part_scales_with_expected() {
        let tol = Tolerance::new(0.0, 1e-2);
        assert!(check_close("x", [100.5], [100.0], tol).is_ok());
        assert!(check_close("x", [0.5], [0.0], tol).is_err());
    }

    #[test]
    fn nan_fails_and_lengths_must_agree() {
        let tol = Tolerance::new(1.0, 1.0);
        assert!(check_close("x", [f64::NAN], [0.0], tol).is_err());
        assert!(check_close("x", [0.0, 1.0], [0.0], tol).is_err());
        assert!(check_close("x", [f64::INFINITY], [f64::INFINITY], tol).is_ok());
    }
}
