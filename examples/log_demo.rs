//! The main demo: many threads log lines to a real file.
//!
//! Three ways to write the same lines, each made durable with `sync_data`:
//!
//! 1. per line: every thread locks the file, writes its line and syncs it;
//! 2. per line, no sync: the same without `sync_data` (not durable);
//! 3. snail-std: threads `add` lines; the worker writes each batch with one
//!    `write_all` and one `sync_data`.
//!
//! It prints lines per second and syscalls per line for each, and checks
//! that every line reached the file exactly once.
//!
//! ```text
//! cargo run --release --example log_demo [-- THREADS LINES_PER_THREAD]
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One log line: which thread, which sequence number.
fn line(thread: usize, seq: usize) -> String {
    format!("thread={thread:02} seq={seq:08} level=info msg=\"request handled\"\n")
}

struct Outcome {
    name: &'static str,
    lines: usize,
    elapsed: Duration,
    syscalls: u64,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
}

/// Every thread writes (and optionally syncs) each line itself.
fn per_line(path: &Path, threads: usize, per_thread: usize, sync: bool) -> io::Result<Outcome> {
    let file = Mutex::new(open(path)?);
    let syscalls = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (file, syscalls) = (&file, &syscalls);
            s.spawn(move || -> io::Result<()> {
                for i in 0..per_thread {
                    let l = line(t, i);
                    let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
                    f.write_all(l.as_bytes())?;
                    syscalls.fetch_add(1, Relaxed);
                    if sync {
                        f.sync_data()?;
                        syscalls.fetch_add(1, Relaxed);
                    }
                }
                Ok(())
            });
        }
    });
    Ok(Outcome {
        name: if sync {
            "per line, write + sync_data"
        } else {
            "per line, write only (not durable)"
        },
        lines: threads * per_thread,
        elapsed: start.elapsed(),
        syscalls: syscalls.into_inner(),
    })
}

/// Threads add lines to a snail-std batcher; the worker writes each batch
/// with one `write_all` and one `sync_data`.
fn batched(
    path: &Path,
    threads: usize,
    per_thread: usize,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut file = open(path)?;
    let syscalls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&syscalls);
    let mut buf = Vec::with_capacity(1000 * 64);
    let start = Instant::now();
    let batcher = snail_std::Batcher::<String>::builder()
        .batch_size(1000)
        .queue_size(2000)
        .linger(Duration::from_millis(5))
        .spawn(move |batch| {
            buf.clear();
            for l in batch.drain() {
                buf.extend_from_slice(l.as_bytes());
            }
            file.write_all(&buf)?;
            file.sync_data()?;
            counter.fetch_add(2, Relaxed);
            Ok::<(), io::Error>(())
        })?;
    std::thread::scope(|s| {
        for t in 0..threads {
            let batcher = &batcher;
            s.spawn(move || {
                for i in 0..per_thread {
                    // Only fails after close, which happens below.
                    let _ = batcher.add(line(t, i));
                }
            });
        }
    });
    let report = batcher.close()?;
    let elapsed = start.elapsed();
    if report.handler_errors > 0 {
        return Err(format!("{} batches failed to write", report.handler_errors).into());
    }
    Ok(Outcome {
        name: "snail-std batches, write + sync_data",
        lines: threads * per_thread,
        elapsed,
        syscalls: syscalls.load(Relaxed),
    })
}

/// Checks that the file holds every line exactly once, each thread's lines
/// in order.
fn verify(path: &Path, threads: usize, per_thread: usize) -> io::Result<()> {
    let mut next = vec![0usize; threads];
    for l in BufReader::new(File::open(path)?).lines() {
        let l = l?;
        let t: usize = l[7..9]
            .parse()
            .map_err(|_| io::Error::other(format!("bad line {l:?}")))?;
        let seq: usize = l[14..22]
            .parse()
            .map_err(|_| io::Error::other(format!("bad line {l:?}")))?;
        if t >= threads || seq != next[t] {
            return Err(io::Error::other(format!(
                "line out of order or duplicated: {l:?}"
            )));
        }
        next[t] += 1;
    }
    if next.iter().any(|&n| n != per_thread) {
        return Err(io::Error::other(format!(
            "lines missing: got {next:?}, want {per_thread} each"
        )));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let per_thread: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    // Syncing every line is slow: give that mode fewer lines.
    let synced_per_thread = (per_thread / 100).max(1);
    let dir = std::env::temp_dir().join(format!("snail-log-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = |name: &str| -> PathBuf { dir.join(name) };

    let runs = [
        (
            per_line(&path("sync.log"), threads, synced_per_thread, true)?,
            synced_per_thread,
        ),
        (
            per_line(&path("nosync.log"), threads, per_thread, false)?,
            per_thread,
        ),
        (
            batched(&path("snail.log"), threads, per_thread)?,
            per_thread,
        ),
    ];
    for (name, n) in [
        ("sync.log", synced_per_thread),
        ("nosync.log", per_thread),
        ("snail.log", per_thread),
    ] {
        verify(&path(name), threads, n)?;
    }
    std::fs::remove_dir_all(&dir)?;

    println!(
        "{threads} threads logging to a file in {}",
        std::env::temp_dir().display()
    );
    println!();
    println!("| method | lines | lines/s | syscalls/line |");
    println!("|---|---|---|---|");
    for (o, _) in &runs {
        println!(
            "| {} | {} | {:.0} | {:.4} |",
            o.name,
            o.lines,
            o.lines as f64 / o.elapsed.as_secs_f64(),
            o.syscalls as f64 / o.lines as f64
        );
    }
    let durable = runs[0].0.lines as f64 / runs[0].0.elapsed.as_secs_f64();
    let snail = runs[2].0.lines as f64 / runs[2].0.elapsed.as_secs_f64();
    println!();
    println!("every line arrived exactly once, in order per thread; durable lines/s: snail {:.0}x per-line sync", snail / durable);
    Ok(())
}
