fn main() {
    eprintln!("spate-perf: not built yet (the perf branch replaces this)");
    std::process::exit(2);
}
