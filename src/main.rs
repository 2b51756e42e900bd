//! The `walrelay` binary: parse flags, run, exit. Everything else lives in
//! the library.

/// mimalloc, not glibc's malloc: allocation was 40% of the relay thread,
/// and drains took about 13% less CPU per event with mimalloc, for a
/// higher peak RSS (docs/performance.md, "Comparing two builds").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    walrelay::cli::main()
}
