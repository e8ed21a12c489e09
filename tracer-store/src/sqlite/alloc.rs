//! SQLite's memory from Rust's global allocator, without SQLite's allocation statistics.
//!
//! By default SQLite calls the C library's `malloc`, and counts every allocation under a global
//! mutex. The collector's own allocations already go to mimalloc; glibc's `malloc`, `free` and
//! their heap trimming (B-tree balancing allocates and frees a scratch buffer of a few pages at
//! the top of the heap), plus that mutex, were ~6% of the collector's CPU when ingesting
//! (perf, steady state). Routed here, SQLite uses whatever the program's global allocator is.
use std::{
    alloc::{alloc, dealloc, realloc, Layout},
    os::raw::{c_int, c_void},
    ptr::null_mut,
    sync::Once,
};

use rusqlite::ffi;

/// Room before each block for its size (`xSize` must answer it, and `dealloc` needs it); 16
/// keeps the blocks as aligned as `malloc`'s.
const HEADER: usize = 16;
const ALIGN: usize = 16;

fn layout(n: usize) -> Option<Layout> {
    Layout::from_size_align(n.checked_add(HEADER)?, ALIGN).ok()
}

unsafe extern "C" fn x_malloc(n: c_int) -> *mut c_void {
    let Some(l) = usize::try_from(n).ok().and_then(layout) else {
        return null_mut();
    };
    // SAFETY: `l` has a non-zero size (HEADER).
    let base = unsafe { alloc(l) };
    if base.is_null() {
        return null_mut();
    }
    // SAFETY: the block is at least HEADER bytes, aligned for a usize.
    unsafe {
        base.cast::<usize>().write(n as usize);
        base.add(HEADER).cast()
    }
}

/// The block's base and its requested size.
///
/// # Safety
/// `p` was returned by `x_malloc` or `x_realloc` and not freed.
unsafe fn block(p: *mut c_void) -> (*mut u8, usize) {
    // SAFETY: the caller's guarantee: HEADER bytes before `p` hold the size.
    unsafe {
        let base = p.cast::<u8>().sub(HEADER);
        (base, base.cast::<usize>().read())
    }
}

unsafe extern "C" fn x_free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: SQLite frees only what these functions returned.
    unsafe {
        let (base, n) = block(p);
        dealloc(base, Layout::from_size_align_unchecked(n + HEADER, ALIGN));
    }
}

unsafe extern "C" fn x_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    if p.is_null() {
        // SAFETY: as `malloc` for a null pointer.
        return unsafe { x_malloc(n) };
    }
    let Some(new) = usize::try_from(n).ok().and_then(layout) else {
        return null_mut();
    };
    // SAFETY: `p` came from these functions; the old layout is the one it was allocated with.
    unsafe {
        let (base, old) = block(p);
        let moved = realloc(
            base,
            Layout::from_size_align_unchecked(old + HEADER, ALIGN),
            new.size(),
        );
        if moved.is_null() {
            return null_mut(); // the old block stays valid, as with realloc
        }
        moved.cast::<usize>().write(n as usize);
        moved.add(HEADER).cast()
    }
}

unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
    if p.is_null() {
        return 0;
    }
    // SAFETY: SQLite asks only about live blocks it got from these functions.
    unsafe { block(p).1 as c_int }
}

unsafe extern "C" fn x_roundup(n: c_int) -> c_int {
    n.saturating_add(7) & !7
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

/// Installs the allocator, once per process, if SQLite has not started yet (configuration is
/// refused after that, and SQLite then keeps `malloc`: slower, as correct).
pub(super) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: null_mut(),
        };
        // SAFETY: both are documented configuration calls with the argument types SQLite
        // expects; SQLite copies `methods`. Before initialization they cannot race with an
        // allocation, and after it they fail without changing anything.
        unsafe {
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods) == ffi::SQLITE_OK
            {
                ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_size_through_realloc() {
        // SAFETY: each pointer comes from these functions and is freed once.
        unsafe {
            let p = x_malloc(10);
            assert!(!p.is_null());
            assert_eq!(p as usize % ALIGN, 0);
            assert_eq!(x_size(p), 10);
            p.cast::<u8>().write_bytes(0xab, 10);
            let q = x_realloc(p, 5000);
            assert_eq!(x_size(q), 5000);
            assert_eq!(*q.cast::<u8>().add(9), 0xab);
            let r = x_realloc(q, 3);
            assert_eq!(x_size(r), 3);
            x_free(r);
            x_free(null_mut());
            assert!(x_malloc(-1).is_null());
            assert_eq!(x_roundup(9), 16);
        }
    }
}
