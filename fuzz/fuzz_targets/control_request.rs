//! The control socket's request line (`control::Request`, JSON): what parses, serialised
//! again, parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::control::Request;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(request) = serde_json::from_str::<Request>(&line) {
        let again = serde_json::to_string(&request).expect("a request serialises");
        assert_eq!(serde_json::from_str::<Request>(&again).ok(), Some(request));
    }
});
