//! The `walrelay` binary: parse flags, run, exit. Everything else lives in
//! the library.

fn main() -> std::process::ExitCode {
    walrelay::cli::main()
}
