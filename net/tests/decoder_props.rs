//! Property tests: arbitrary bytes into the frame/header/body decoders never panic, abort or
//! allocate without bound, and well-formed frames with random bodies are handled the same way.

use proptest::prelude::*;
use spate_net::dispatch::decode_frame_for_fuzzing;
use spate_net::versions::SUPPORTED;

#[global_allocator]
static ALLOC: spate_net::alloc::NoReserveLargeAlloc = spate_net::alloc::NoReserveLargeAlloc;

const MAX_FRAME_BYTES: usize = 1 << 20;

fn framed(api_key: i16, version: i16, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&api_key.to_be_bytes());
    frame.extend_from_slice(&version.to_be_bytes());
    frame.extend_from_slice(&1i32.to_be_bytes());
    frame.extend_from_slice(body);
    let mut out = (frame.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&frame);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_frame_for_fuzzing(&bytes, MAX_FRAME_BYTES);
    }

    #[test]
    fn random_bodies_of_served_apis_never_panic(
        which in 0..SUPPORTED.len(),
        version_offset in 0i16..16,
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let s = SUPPORTED[which];
        let version = s.min + version_offset % (s.max - s.min + 1);
        decode_frame_for_fuzzing(&framed(s.key as i16, version, &body), MAX_FRAME_BYTES);
    }

    #[test]
    fn huge_counts_are_refused(which in 0..SUPPORTED.len(), count in any::<i32>(), client_id_len in 0i16..4) {
        let s = SUPPORTED[which];
        let mut body = client_id_len.to_be_bytes().to_vec();
        body.extend(std::iter::repeat_n(b'a', client_id_len as usize));
        body.extend_from_slice(&count.to_be_bytes());
        body.extend_from_slice(&count.to_be_bytes());
        decode_frame_for_fuzzing(&framed(s.key as i16, s.max.min(8), &body), MAX_FRAME_BYTES);
    }
}
