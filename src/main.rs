fn main() {
    eprintln!("spate: not built yet (the net branch replaces this)");
    std::process::exit(2);
}
