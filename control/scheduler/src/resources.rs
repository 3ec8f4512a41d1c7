//! The two resources the scheduler accounts for.
use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount of CPU and memory: a node's capacity, what an instance asks for, or what is free.
///
/// Sums saturate at `u64::MAX` in the scheduler's own accounting, so an absurd total never wraps
/// round to a small number that would "fit".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_milli: u64,
    /// Memory in MiB.
    pub mem_mib: u64,
}

impl Resources {
    /// Nothing.
    pub const ZERO: Resources = Resources {
        cpu_milli: 0,
        mem_mib: 0,
    };

    /// `cpu_milli` thousandths of a core and `mem_mib` MiB.
    pub const fn new(cpu_milli: u64, mem_mib: u64) -> Self {
        Resources { cpu_milli, mem_mib }
    }

    /// `self + other`, or `None` if either dimension overflows.
    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_milli: self.cpu_milli.checked_add(other.cpu_milli)?,
            mem_mib: self.mem_mib.checked_add(other.mem_mib)?,
        })
    }

    /// `self - other`, or `None` if `other` is larger in either dimension.
    pub fn checked_sub(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_milli: self.cpu_milli.checked_sub(other.cpu_milli)?,
            mem_mib: self.mem_mib.checked_sub(other.mem_mib)?,
        })
    }

    /// `self + other`, each dimension clamped at `u64::MAX`.
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_add(other.cpu_milli),
            mem_mib: self.mem_mib.saturating_add(other.mem_mib),
        }
    }

    /// `self - other`, each dimension clamped at zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_sub(other.cpu_milli),
            mem_mib: self.mem_mib.saturating_sub(other.mem_mib),
        }
    }

    /// Whether `self` fits in `available`, in every dimension.
    pub fn fits(self, available: Resources) -> bool {
        self.cpu_milli <= available.cpu_milli && self.mem_mib <= available.mem_mib
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m cpu, {} MiB", self.cpu_milli, self.mem_mib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_checks_both_dimensions() {
        let a = Resources::new(1000, 512);
        let b = Resources::new(500, 1024);
        assert_eq!(a.checked_add(b), Some(Resources::new(1500, 1536)));
        assert_eq!(a.checked_sub(b), None);
        assert_eq!(
            b.checked_sub(Resources::new(500, 24)),
            Some(Resources::new(0, 1000))
        );
        assert_eq!(
            Resources::new(u64::MAX, 0).checked_add(Resources::new(1, 0)),
            None
        );
        assert_eq!(a.saturating_sub(b), Resources::new(500, 0));
        assert_eq!(
            Resources::new(u64::MAX, 1).saturating_add(a),
            Resources::new(u64::MAX, 513)
        );
    }

    #[test]
    fn fits_needs_every_dimension() {
        let free = Resources::new(1000, 1000);
        assert!(Resources::new(1000, 1000).fits(free));
        assert!(Resources::ZERO.fits(Resources::ZERO));
        assert!(!Resources::new(1001, 1).fits(free));
        assert!(!Resources::new(1, 1001).fits(free));
    }
}
