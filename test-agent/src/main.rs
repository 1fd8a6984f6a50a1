fn main() {
    eprintln!("windshift-test-agent: not built yet");
    std::process::exit(1);
}
