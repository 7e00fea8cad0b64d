//! The `--inject-nonfinite STEP[,STEP...]` testing aid: poison the gradients at chosen steps to
//! exercise the skip-and-back-off path end to end.

use std::collections::BTreeSet;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::PrecisionError;

/// The set of optimizer steps whose gradients get an injected non-finite value.
///
/// Parses from a comma-separated list of step numbers, e.g. `"3,10, 25"` (spaces allowed,
/// duplicates ignored, order free). The empty string is an error: leave the option out instead.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonFiniteInjection {
    steps: BTreeSet<u64>,
}

impl NonFiniteInjection {
    /// No injection at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Injection at exactly these steps.
    pub fn at(steps: impl IntoIterator<Item = u64>) -> Self {
        NonFiniteInjection {
            steps: steps.into_iter().collect(),
        }
    }

    /// Parses `STEP[,STEP...]`; the error names the offending item.
    pub fn parse(input: &str) -> Result<Self, PrecisionError> {
        let bad = |item: &str, reason| PrecisionError::BadInjectList {
            input: input.to_string(),
            item: item.to_string(),
            reason,
        };
        if input.trim().is_empty() {
            return Err(bad("", "is empty: give at least one step number"));
        }
        let mut steps = BTreeSet::new();
        for item in input.split(',') {
            let t = item.trim();
            if t.is_empty() {
                return Err(bad(item, "is empty (stray comma?)"));
            }
            if !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(t, "is not a non-negative integer step number"));
            }
            let step = t
                .parse::<u64>()
                .map_err(|_| bad(t, "is too large for a step number"))?;
            steps.insert(step);
        }
        Ok(NonFiniteInjection { steps })
    }

    /// The chosen steps, ascending.
    pub fn steps(&self) -> impl Iterator<Item = u64> + '_ {
        self.steps.iter().copied()
    }

    /// Whether nothing will be injected.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether `step` is one of the chosen steps.
    pub fn should_inject(&self, step: u64) -> bool {
        self.steps.contains(&step)
    }

    /// At a chosen step, writes `+inf` into the first gradient element and returns `true`;
    /// otherwise (or when `grads` is empty) leaves `grads` alone and returns `false`.
    pub fn inject(&self, step: u64, grads: &mut [f32]) -> bool {
        match grads.first_mut() {
            Some(g) if self.should_inject(step) => {
                *g = f32::INFINITY;
                true
            }
            _ => false,
        }
    }
}

impl FromStr for NonFiniteInjection {
    type Err = PrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NonFiniteInjection::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        let inj: NonFiniteInjection = "10, 3,10,25".parse().unwrap();
        assert_eq!(inj.steps().collect::<Vec<_>>(), vec![3, 10, 25]);
        assert!(inj.should_inject(3) && inj.should_inject(25));
        assert!(!inj.should_inject(4));
        assert!(!NonFiniteInjection::none().should_inject(0));
    }

    #[test]
    fn bad_lists_name_the_item() {
        for (input, item) in [
            ("", ""),
            ("3,,4", ""),
            ("3,x", "x"),
            ("-1", "-1"),
            ("2.5", "2.5"),
            ("99999999999999999999999", "99999999999999999999999"),
        ] {
            let e = NonFiniteInjection::parse(input).unwrap_err();
            match &e {
                PrecisionError::BadInjectList { item: got, .. } => {
                    assert_eq!(got.trim(), item, "{input}")
                }
                other => panic!("unexpected error {other:?}"),
            }
            assert!(e.to_string().contains("--inject-nonfinite"), "{e}");
        }
    }

    #[test]
    fn inject_poisons_only_chosen_steps() {
        let inj = NonFiniteInjection::at([2]);
        let mut g = vec![1.0f32; 4];
        assert!(!inj.inject(1, &mut g));
        assert!(g.iter().all(|x| x.is_finite()));
        assert!(inj.inject(2, &mut g));
        assert!(g[0].is_infinite() && g[1] == 1.0);
        assert!(!inj.inject(2, &mut []));
    }
}
