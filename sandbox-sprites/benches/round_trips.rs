//! Round trips per operation (placeholder until the emulator-backed bench lands).
fn main() {}
