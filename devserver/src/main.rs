fn main() {
    eprintln!("windshift-devserver: not built yet");
    std::process::exit(1);
}
