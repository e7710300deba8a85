//! Criterion benches of the actor runtime (filled in below).

fn main() {}
