//! Body: `windshift_runner::fuzzing::go_duration` (see its doc for the input format and the
//! invariants it checks). `tests/fuzz_corpus.rs` replays the committed corpus on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = windshift_runner::fuzzing::go_duration(data);
});
