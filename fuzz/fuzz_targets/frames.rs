//! Needs root: loads the classifier into a network namespace of its own
//! and runs every input through BPF_PROG_TEST_RUN and the userspace model.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbx_net::fuzzing::frames(data));
