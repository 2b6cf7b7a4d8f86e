//! OmniRelay benchmarks. Each scenario lands with the capability it measures;
//! see `bench/README.md`.
//!
//! Usage: `cargo run --release -p omnirelay-bench -- <scenario> [options]`.

mod hub;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("failed to start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = match args.first().map(String::as_str) {
        Some("hub") => runtime.block_on(hub::run(&args[1..])),
        _ => {
            eprintln!("usage: omnirelay-bench <scenario> [options]\nscenarios:\n  hub    {}", hub::SUMMARY);
            return std::process::ExitCode::FAILURE;
        }
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("benchmark failed: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
