//! `cargo bench --bench fuzz [-- CASES]`: the parser properties of `tests/hostile_input.rs`
//! (kickoff parameters, `_typeFilter`, Parameters bodies, FHIRPath text deep, long and random) over
//! many generated inputs (default 200,000 per property), with the rate.

#[path = "../properties/mod.rs"]
mod properties;

fn main() {
    let cases: u32 = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(200_000);
    let started = std::time::Instant::now();
    properties::run_all(cases);
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "fuzz: 4 properties x {cases} generated inputs, no failure, in {seconds:.1} s ({:.0} inputs/s)",
        4.0 * cases as f64 / seconds
    );
}
