//! Journal record bytes → decode → re-encode round trip → replay. The body lives in the
//! library (`journal::fuzz_decode_and_replay`) so `tests/fuzz_corpus.rs` replays the corpus
//! on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = windshift_runner::journal::fuzz_decode_and_replay(data);
});
