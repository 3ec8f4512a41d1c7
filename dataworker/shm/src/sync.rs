//! The atomic words the shared-memory protocols run on, behind a trait, so that one protocol
//! implementation runs on `std` atomics laid over shared memory in production and on loom's
//! atomics in ordinary memory in the models (`cargo test` runs them; see the `loom` test
//! modules of `ctl.rs` and `pins.rs`).
//!
//! A protocol is written once, generic over a [`Model`] (the family of atomic types and its
//! fence), and takes references to the words it works on. Production code instantiates it
//! with [`Std`] over words it found in a mapping; a model instantiates it with loom's types
//! over words it allocated itself.
//!
//! Rules every protocol here follows, because some of its words may live in a read-only
//! mapping (the index, as clients see it) or be written by a hostile process:
//! - on memory the caller may only read, only `Relaxed` or `Acquire` loads (no `SeqCst`
//!   load, no read-modify-write: those may write); cross-word ordering comes from fences;
//! - a value read from memory another process can write is untrusted: it is read once into
//!   a local and checked before it is used as a length, index or offset.
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One atomic word of a protocol (an `AtomicU64` or `AtomicU32`, std or loom).
pub trait Word: Send + Sync {
    /// The integer it holds.
    type V: Copy + Eq + Debug;
    /// Atomic load.
    fn load(&self, order: Ordering) -> Self::V;
    /// Atomic store.
    fn store(&self, v: Self::V, order: Ordering);
    /// Atomic add (wrapping); returns the previous value.
    fn fetch_add(&self, v: Self::V, order: Ordering) -> Self::V;
    /// Atomic subtract (wrapping); returns the previous value.
    fn fetch_sub(&self, v: Self::V, order: Ordering) -> Self::V;
    /// Atomic maximum; returns the previous value.
    fn fetch_max(&self, v: Self::V, order: Ordering) -> Self::V;
}

/// A family of atomic types and its fence: what a protocol is generic over.
pub trait Model: 'static {
    /// The 64-bit word.
    type U64: Word<V = u64>;
    /// The 32-bit word.
    type U32: Word<V = u32>;
    /// A memory fence of this model.
    fn fence(order: Ordering);
}

/// The real thing: `std::sync::atomic`.
#[derive(Debug)]
pub enum Std {}

impl Model for Std {
    type U64 = AtomicU64;
    type U32 = AtomicU32;
    #[inline]
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order);
    }
}

macro_rules! std_word {
    ($t:ty, $v:ty) => {
        impl Word for $t {
            type V = $v;
            #[inline]
            fn load(&self, order: Ordering) -> $v {
                <$t>::load(self, order)
            }
            #[inline]
            fn store(&self, v: $v, order: Ordering) {
                <$t>::store(self, v, order)
            }
            #[inline]
            fn fetch_add(&self, v: $v, order: Ordering) -> $v {
                <$t>::fetch_add(self, v, order)
            }
            #[inline]
            fn fetch_sub(&self, v: $v, order: Ordering) -> $v {
                <$t>::fetch_sub(self, v, order)
            }
            #[inline]
            fn fetch_max(&self, v: $v, order: Ordering) -> $v {
                <$t>::fetch_max(self, v, order)
            }
        }
    };
}

std_word!(AtomicU64, u64);
std_word!(AtomicU32, u32);

/// loom's atomics as a [`Model`], for the models in this crate's tests.
#[cfg(test)]
pub(crate) mod loom_model {
    use super::{Model, Word};
    use std::sync::atomic::Ordering;

    /// loom's atomics.
    pub(crate) enum Loom {}

    impl Model for Loom {
        type U64 = loom::sync::atomic::AtomicU64;
        type U32 = loom::sync::atomic::AtomicU32;
        fn fence(order: Ordering) {
            loom::sync::atomic::fence(order);
        }
    }

    macro_rules! loom_word {
        ($t:ty, $v:ty) => {
            impl Word for $t {
                type V = $v;
                fn load(&self, order: Ordering) -> $v {
                    <$t>::load(self, order)
                }
                fn store(&self, v: $v, order: Ordering) {
                    <$t>::store(self, v, order)
                }
                fn fetch_add(&self, v: $v, order: Ordering) -> $v {
                    <$t>::fetch_add(self, v, order)
                }
                fn fetch_sub(&self, v: $v, order: Ordering) -> $v {
                    <$t>::fetch_sub(self, v, order)
                }
                fn fetch_max(&self, v: $v, order: Ordering) -> $v {
                    <$t>::fetch_max(self, v, order)
                }
            }
        };
    }

    loom_word!(loom::sync::atomic::AtomicU64, u64);
    loom_word!(loom::sync::atomic::AtomicU32, u32);
}
