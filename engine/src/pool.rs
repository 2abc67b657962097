//! Page-aligned buffer memory: one arena per shard, cut into equal slots (one slot = one I/O block in flight).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every slot: enough for O_DIRECT on any common device and for page-granular registration.
pub const ALIGN_BYTES: usize = 4096;

/// A fixed-size, page-aligned allocation divided into `slots` blocks of `block_bytes`. Allocated once at shard
/// start and never grown: the shard's memory bound.
pub struct AlignedArena {
    ptr: NonNull<u8>,
    layout: Layout,
    block_bytes: usize,
    slots: usize,
}

// SAFETY: the arena is plain memory owned by one shard; slots are handed out by index and never aliased by the
// shard's own bookkeeping.
unsafe impl Send for AlignedArena {}

impl AlignedArena {
    /// Allocate `slots` blocks of `block_bytes` (a multiple of [`ALIGN_BYTES`]).
    pub fn new(block_bytes: usize, slots: usize) -> Self {
        assert!(block_bytes > 0 && block_bytes.is_multiple_of(ALIGN_BYTES), "block size must be page-aligned");
        assert!(slots > 0, "an arena needs at least one slot");
        let layout = Layout::from_size_align(block_bytes * slots, ALIGN_BYTES).expect("arena layout");
        // SAFETY: layout has non-zero size.
        let ptr =
            NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedArena { ptr, layout, block_bytes, slots }
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Start of slot `i`.
    pub fn slot_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.slots);
        // SAFETY: in bounds of the allocation.
        unsafe { self.ptr.as_ptr().add(i * self.block_bytes) }
    }

    /// Slot `i` as a mutable slice.
    ///
    /// # Safety
    /// No I/O may be in flight on this slot, and no other reference to it may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, i: usize) -> &mut [u8] {
        // SAFETY: caller guarantees exclusivity; bounds checked by slot_ptr.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(i), self.block_bytes) }
    }

    /// The whole arena as (address, length), for buffer registration.
    pub fn as_raw(&self) -> (*mut u8, usize) {
        (self.ptr.as_ptr(), self.layout.size())
    }
}

impl Drop for AlignedArena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_disjoint() {
        let a = AlignedArena::new(8192, 3);
        for i in 0..3 {
            assert_eq!(a.slot_ptr(i) as usize % ALIGN_BYTES, 0);
        }
        assert_eq!(a.slot_ptr(1) as usize - a.slot_ptr(0) as usize, 8192);
        // SAFETY: no I/O in flight in a test.
        unsafe { a.slot_mut(2)[8191] = 7 };
        assert_eq!(a.as_raw().1, 3 * 8192);
    }
}
