#![no_main]
//! Key parsing never panics, accepts only token68, and wipes everything it does not keep.

use libfuzzer_sys::fuzz_target;
use responses_api_proxy::secret::{self, MAX_KEY_LEN};

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let input = data.get(1..).unwrap_or(&[]);
    let mut buf = vec![0u8; MAX_KEY_LEN + 2];
    let mut pos = 0;
    let r = secret::read_line_with(&mut buf, |out| {
        let n = chunk.min(out.len()).min(input.len() - pos);
        out[..n].copy_from_slice(&input[pos..pos + n]);
        pos += n;
        Ok(n)
    });
    let keep = *r.as_ref().unwrap_or(&0);
    assert!(buf[keep..].iter().all(|&b| b == 0));
    if let Ok(n) = r {
        assert!(secret::validate_key(&buf[..n]).is_ok());
    }
});
