//! The `walrelay` binary: parse flags, run, exit. Everything else lives in
//! the library.

/// mimalloc, not glibc's malloc: allocation was 40% of the relay thread,
/// and a drain of 200,000 events took 24% less CPU with mimalloc (15% with
/// jemalloc), for a higher peak RSS (docs/performance.md, "walrelay's own
/// cost").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    walrelay::cli::main()
}
