//! OmniRelay benchmarks. Each scenario lands with the capability it measures;
//! see `bench/README.md`.

fn main() {
    eprintln!("no benchmarks yet; see bench/README.md");
}
