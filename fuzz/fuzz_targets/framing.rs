#![no_main]
//! The head sniffer never panics and gives the same verdict however the bytes are split.

use libfuzzer_sys::fuzz_target;
use responses_api_proxy::framing::HeadSniffer;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let mut whole = HeadSniffer::default();
    let a = whole.feed(rest);
    let mut split = HeadSniffer::default();
    let step = usize::from(seed % 13) + 1;
    let b = rest.chunks(step).find_map(|c| split.feed(c));
    assert_eq!(a, b);
});
