//! The standard workload (`BENCHMARK.md`) as one markdown table: rows are
//! producer counts, columns implementations, cells Mitems/s (best of the
//! runs) and the ratio to crossbeam-channel measured in the same run.
//!
//! ```text
//! cargo run --release --example throughput -- --items 10000000 --runs 3 --producers 1,2,4,8,16,64
//! cargo run --release --example throughput -- --impls snail-std-add,crossbeam
//! ```
//!
//! Options (or environment variables): `--items N` (`SNAIL_ITEMS`, default
//! 10 million), `--runs R` (`SNAIL_RUNS`, default 3), `--producers LIST`
//! (`SNAIL_PRODUCERS`, default 1,2,4,8,16,64), `--impls LIST`
//! (`SNAIL_IMPLS`, default all). Builds as a static binary too:
//! `cargo build --release --example throughput --target x86_64-unknown-linux-musl`.

use std::process::ExitCode;
use std::time::Duration;

#[path = "../benches/workload/mod.rs"]
mod workload;

use workload::Impl;

struct Options {
    items: u64,
    runs: usize,
    producers: Vec<usize>,
    impls: Vec<Impl>,
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| f(x).ok_or_else(|| format!("bad list entry {x:?}")))
        .collect()
}

fn parse_count(s: &str) -> Option<u64> {
    s.replace('_', "").parse().ok().filter(|&n| n > 0)
}

fn set(opts: &mut Options, key: &str, value: &str) -> Result<(), String> {
    let bad = || format!("bad value {value:?} for {key}");
    match key {
        "items" => opts.items = parse_count(value).ok_or_else(bad)?,
        "runs" => opts.runs = parse_count(value).ok_or_else(bad)? as usize,
        "producers" => {
            opts.producers = parse_list(value, |x| parse_count(x).map(|n| n as usize))?;
        }
        "impls" => {
            // Without crossbeam (the reference column) cells show no ratio.
            opts.impls = parse_list(value, Impl::from_name)?;
        }
        _ => return Err(format!("unknown option --{key}")),
    }
    Ok(())
}

fn options() -> Result<Options, String> {
    let mut opts = Options {
        items: 10_000_000,
        runs: 3,
        producers: vec![1, 2, 4, 8, 16, 64],
        impls: Impl::ALL.to_vec(),
    };
    for key in ["items", "runs", "producers", "impls"] {
        if let Ok(value) = std::env::var(format!("SNAIL_{}", key.to_uppercase())) {
            set(&mut opts, key, &value)?;
        }
    }
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            let names: Vec<_> = Impl::ALL.iter().map(|i| i.name()).collect();
            return Err(format!(
                "usage: throughput [--items N] [--runs R] [--producers 1,2,...] [--impls {}]",
                names.join(",")
            ));
        }
        let Some(key) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => {
                let v = args
                    .next()
                    .ok_or_else(|| format!("--{key} needs a value"))?;
                (key.to_owned(), v)
            }
        };
        set(&mut opts, &key, &value)?;
    }
    Ok(opts)
}

/// CPU model and logical CPU count from /proc/cpuinfo, and the usable
/// parallelism.
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let logical = info.lines().filter(|l| l.starts_with("processor")).count();
    let usable = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{model}, {logical} logical CPUs in /proc/cpuinfo, {usable} usable, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn main() -> ExitCode {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let ratio = if opts.impls.contains(&Impl::Crossbeam) {
        " (ratio to crossbeam)"
    } else {
        ""
    };
    println!(
        "## Standard workload: Mitems/s, best of {} runs{ratio}\n",
        opts.runs
    );
    println!("- machine: {}", machine());
    println!(
        "- snail-std shard locks: {}",
        if snail_std::bias::expedited_after_probe() {
            "biased, revoked with membarrier (owner enters with a compiler fence)"
        } else {
            "never biased (membarrier unavailable): spin locks"
        }
    );
    let probe = snail_std::Batcher::<u64>::builder()
        .batch_size(workload::BATCH)
        .queue_size(workload::QUEUE)
        .spawn(|_| Ok::<(), std::convert::Infallible>(()))
        .expect("spawn a snail-std batcher");
    println!(
        "- snail-std: {} shards, {} buffers (a buffer per shard, plus the queue)",
        probe.shards(),
        probe.buffers()
    );
    drop(probe);
    println!(
        "- {} items per run, batch {}, queue {}, add_many chunks of {}",
        opts.items,
        workload::BATCH,
        workload::QUEUE,
        workload::CHUNK
    );
    println!("- array-1thread: one thread stores into a warm 1000-slot array and sums it (no synchronisation)\n");

    let mut header = String::from("| P |");
    let mut rule = String::from("|---|");
    for imp in &opts.impls {
        header += &format!(" {} |", imp.name());
        rule += "---|";
    }
    println!("{header}\n{rule}");

    for &p in &opts.producers {
        // Best time per implementation; runs interleave implementations so
        // that a noisy moment does not hit one column only.
        let mut best: Vec<Option<Duration>> = vec![None; opts.impls.len()];
        for _ in 0..opts.runs {
            for (i, imp) in opts.impls.iter().enumerate() {
                if imp.supports(p) {
                    let t = imp.run(p, opts.items);
                    best[i] = Some(best[i].map_or(t, |b| b.min(t)));
                }
            }
        }
        let rate = |t: Duration| opts.items as f64 / t.as_secs_f64() / 1e6;
        let reference = opts
            .impls
            .iter()
            .position(|&i| i == Impl::Crossbeam)
            .and_then(|i| best[i])
            .map(rate);
        let mut row = format!("| {p} |");
        for t in &best {
            match (t.map(rate), reference) {
                (Some(r), Some(c)) => row += &format!(" {r:.1} ({:.1}x) |", r / c),
                (Some(r), None) => row += &format!(" {r:.1} |"),
                (None, _) => row += " - |",
            }
        }
        println!("{row}");
    }
    ExitCode::SUCCESS
}
