#![allow(unexpected_cfgs)]
#![cfg(not(snail_loom))]
//! Zero steady-state allocation: after warm-up, a million `add`s allocate
//! nothing, on the producing threads or on the worker.
//!
//! The counting allocator applies to this whole test binary, so it counts
//! only on threads that flagged themselves; keep this file's tests minimal.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use snail_std::Batcher;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, SeqCst);
    }
}

// SAFETY: forwards every call to `System` unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note();
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ADDS: u64 = 1_000_000;

#[test]
fn a_million_adds_allocate_nothing() {
    // The counter works: a flagged thread's allocation is seen.
    let before = ALLOCS.load(SeqCst);
    COUNTED.with(|f| f.set(true));
    drop(std::hint::black_box(Box::new(1u64)));
    COUNTED.with(|f| f.set(false));
    assert_eq!(
        ALLOCS.load(SeqCst) - before,
        2,
        "alloc + dealloc not counted"
    );
    ALLOCS.store(0, SeqCst);

    // The worker counts its own allocations once told to.
    let count_worker = Arc::new(AtomicBool::new(false));
    let sum = Arc::new(AtomicU64::new(0));
    let (c, s) = (Arc::clone(&count_worker), Arc::clone(&sum));
    let b = Batcher::<u64>::builder()
        .batch_size(256)
        .queue_size(1024)
        .linger(Duration::from_millis(1))
        .spawn(move |batch| {
            COUNTED.with(|f| f.set(c.load(SeqCst)));
            s.fetch_add(batch.drain().sum::<u64>(), SeqCst);
            Ok::<(), String>(())
        })
        .unwrap();

    // Warm-up: first use of each thread's shard, the worker's first park,
    // linger flushes, blocked waits.
    let warm = |b: &Batcher<u64>| {
        for i in 0..20_000 {
            b.add(i).unwrap();
        }
        b.flush();
    };
    warm(&b);
    std::thread::sleep(Duration::from_millis(20));
    count_worker.store(true, SeqCst);

    // One producer.
    let before = ALLOCS.load(SeqCst);
    COUNTED.with(|f| f.set(true));
    for i in 0..ADDS {
        b.add(i).unwrap();
    }
    COUNTED.with(|f| f.set(false));
    let one = ALLOCS.load(SeqCst) - before;

    // Two producers (spawned and warmed up before counting).
    let barrier = std::sync::Barrier::new(2);
    let two = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (b, barrier) = (&b, &barrier);
                s.spawn(move || {
                    warm(b);
                    barrier.wait();
                    let before = ALLOCS.load(SeqCst);
                    COUNTED.with(|f| f.set(true));
                    for i in 0..ADDS / 2 {
                        b.add(i).unwrap();
                    }
                    COUNTED.with(|f| f.set(false));
                    ALLOCS.load(SeqCst) - before
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    });
    // Let the worker drain while still counting.
    b.flush();
    std::thread::sleep(Duration::from_millis(50));
    let total = ALLOCS.load(SeqCst);
    count_worker.store(false, SeqCst);

    eprintln!("allocations during 1M adds: one producer {one}, two producers {two}; counted threads in total {total}");
    assert_eq!(one, 0, "one producer allocated");
    assert_eq!(two, 0, "two producers allocated");
    assert_eq!(total, 0, "producers or the worker allocated");
    let report = b.close().unwrap();
    assert_eq!(report.items, 3 * 20_000 + 2 * ADDS);
}
