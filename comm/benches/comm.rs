//! Benchmarks of meshflow-comm (filled in below).
fn main() {}
