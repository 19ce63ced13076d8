//! Bare-metal check of the snail core on QEMU's mps2-an386 (Cortex-M4).
//!
//! The SysTick exception handler is the producer: each tick it adds a burst
//! of numbered items `0, 1, 2, ..` with `try_add`, and when the batcher is
//! full it counts the refusal and retries the same number on the next tick.
//! The main loop is the consumer: it takes batches with `try_take` and
//! `take_next`, drains them, checks that every number arrives exactly once
//! and in order, and calls `tick()` once per SysTick period so that partial
//! batches (and the last one) get sealed. Now and then it holds a batch for a few ticks, so
//! that the producer finds every buffer in use and is refused.
//!
//! The result goes to the host through semihosting; the exit status of QEMU
//! is the verdict. Every failure (wrong number, timeout, panic, HardFault,
//! unexpected interrupt) prints a `FAILED` line and exits with failure.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception, ExceptionFrame};
use cortex_m_semihosting::{debug, hprintln};
use snail::CsBatcher;

/// Items the producer adds: `0..N`.
const N: u32 = 2000;
const BATCH: usize = 16;
const BUFFERS: usize = 4;

/// Interrupt handler adds, main loop takes: a critical-section lock.
static BATCHER: CsBatcher<u32, BATCH, BUFFERS> = CsBatcher::new();

/// The mps2 boards clock the core at 25 MHz: a SysTick every 1 ms.
const SYSTICK_RELOAD: u32 = 25_000 - 1;
/// The producer adds 1..=MAX_BURST items per tick, varying with the tick.
const MAX_BURST: u32 = 16;
/// Every HOLD_EVERY-th batch, the consumer keeps the batch for HOLD_TICKS
/// ticks before draining it: the producer then runs out of buffers.
const HOLD_EVERY: u32 = 10;
const HOLD_TICKS: u32 = 8;
/// Give up after this many ticks (20 s) instead of hanging.
const TIMEOUT_TICKS: u32 = 20_000;

/// SysTick periods elapsed; written only by the SysTick handler.
static TICKS: AtomicU32 = AtomicU32::new(0);
/// The next number to add; written only by the SysTick handler.
static NEXT: AtomicU32 = AtomicU32::new(0);
/// `try_add` calls refused because every buffer was in use.
static REFUSED: AtomicU32 = AtomicU32::new(0);

#[entry]
fn main() -> ! {
    let mut cp = cortex_m::Peripherals::take().unwrap();
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(SYSTICK_RELOAD);
    cp.SYST.clear_current();
    cp.SYST.enable_interrupt();
    cp.SYST.enable_counter();

    let mut expected: u32 = if cfg!(feature = "fail-demo") { 1 } else { 0 };
    let mut batches: u32 = 0;
    let mut last_tick = TICKS.load(Relaxed);

    while expected < N {
        let mut idle = true;
        // From one batch to the next with `take_next`: the buffer goes back
        // and the next batch comes out in one critical section.
        let mut next = BATCHER.try_take();
        while let Some(mut batch) = next {
            idle = false;
            batches += 1;
            let len = batch.len();
            if len == 0 || len > BATCH {
                fail(format_args!("batch {batches} holds {len} items"));
            }
            if cfg!(feature = "panic-demo") && batches == 3 {
                panic!("panic-demo: batch {batches} starts at {}", batch[0]);
            }
            if cfg!(feature = "fault-demo") && batches == 3 {
                cortex_m::asm::udf();
            }
            if batches.is_multiple_of(HOLD_EVERY) {
                // Keep the buffer while the producer runs.
                let start = TICKS.load(Relaxed);
                while TICKS.load(Relaxed).wrapping_sub(start) < HOLD_TICKS {
                    cortex_m::asm::wfi();
                }
            }
            let mut drained = 0;
            for item in batch.drain() {
                drained += 1;
                if item != expected {
                    if item > expected && item < N {
                        fail(format_args!(
                            "item {item} arrived where {expected} was expected: {} lost",
                            item - expected
                        ));
                    } else {
                        fail(format_args!(
                            "item {item} arrived where {expected} was expected: duplicated, out of order or out of range"
                        ));
                    }
                }
                expected += 1;
            }
            if drained != len {
                fail(format_args!(
                    "batch {batches} held {len} items but drained {drained}"
                ));
            }
            next = batch.take_next();
        }

        let now = TICKS.load(Relaxed);
        if now != last_tick {
            last_tick = now;
            BATCHER.tick();
            idle = false;
        }
        if now > TIMEOUT_TICKS {
            fail(format_args!(
                "timeout after {now} ticks: {expected} of {N} items arrived, producer at {}",
                NEXT.load(Relaxed)
            ));
        }
        if idle {
            // The next SysTick wakes us.
            cortex_m::asm::wfi();
        }
    }

    // Every number arrived. The producer has stopped (NEXT == N); nothing
    // may be left in the batcher, and its counters must agree with ours.
    let refused = REFUSED.load(Relaxed);
    if let Some(batch) = BATCHER.try_take() {
        fail(format_args!(
            "an extra batch of {} items after the last number",
            batch.len()
        ));
    }
    if !BATCHER.is_empty() {
        fail(format_args!("{} items left in the batcher", BATCHER.len()));
    }
    let stats = BATCHER.stats();
    if stats.added != N as usize
        || stats.refused != refused as usize
        || stats.taken != batches as usize
        || stats.sealed() != batches as usize
    {
        fail(format_args!(
            "counters disagree: {stats:?}; counted {N} items, {batches} batches, refused {refused}"
        ));
    }
    hprintln!(
        "snail-firmware: sealed {} full + {} by tick + {} by flush, {} ticks, batcher is {} bytes",
        stats.sealed_full,
        stats.sealed_tick,
        stats.sealed_flush,
        TICKS.load(Relaxed),
        core::mem::size_of_val(&BATCHER)
    );
    // (hprintln! with a lone literal prints it verbatim: pass the values.)
    hprintln!(
        "snail-firmware: {} items in {} batches, in order, 0 lost, 0 duplicated, refused {}",
        N,
        batches,
        refused
    );
    debug::exit(debug::EXIT_SUCCESS);
    halt()
}

/// The producer: a burst of numbered items per tick.
#[exception]
fn SysTick() {
    let ticks = TICKS.load(Relaxed).wrapping_add(1);
    TICKS.store(ticks, Relaxed);
    let burst = 1 + ticks.wrapping_mul(7) % MAX_BURST;
    let mut next = NEXT.load(Relaxed);
    for _ in 0..burst {
        if next == N {
            break;
        }
        match BATCHER.try_add(next) {
            Ok(()) => next += 1,
            Err(_full) => {
                // Retry the same number on the next tick: none is skipped.
                REFUSED.store(REFUSED.load(Relaxed) + 1, Relaxed);
                break;
            }
        }
    }
    NEXT.store(next, Relaxed);
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    hprintln!(
        "snail-firmware: FAILED: HardFault at pc {:#010x}",
        frame.pc()
    );
    debug::exit(debug::EXIT_FAILURE);
    halt()
}

#[exception]
unsafe fn DefaultHandler(irqn: i16) {
    fail(format_args!("unexpected exception or interrupt {irqn}"));
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    cortex_m::interrupt::disable();
    match info.location() {
        Some(at) => hprintln!(
            "snail-firmware: FAILED: panic at {}:{}: {}",
            at.file(),
            at.line(),
            info.message()
        ),
        None => hprintln!("snail-firmware: FAILED: panic: {}", info.message()),
    }
    debug::exit(debug::EXIT_FAILURE);
    halt()
}

/// Reports a failed check and exits QEMU with failure.
fn fail(what: core::fmt::Arguments) -> ! {
    cortex_m::interrupt::disable();
    hprintln!("snail-firmware: FAILED: {}", what);
    debug::exit(debug::EXIT_FAILURE);
    halt()
}

/// Only reached without a semihosting host (a real board): stop here; the
/// check script's timeout catches a QEMU that does not exit.
fn halt() -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}
