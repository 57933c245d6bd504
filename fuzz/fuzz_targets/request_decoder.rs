//! Arbitrary bytes as a Kafka request frame: framing, header, body and record-batch checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: spate_net::alloc::NoReserveLargeAlloc = spate_net::alloc::NoReserveLargeAlloc;

fuzz_target!(|data: &[u8]| {
    spate_net::dispatch::decode_frame_for_fuzzing(data, 1 << 20);
});
