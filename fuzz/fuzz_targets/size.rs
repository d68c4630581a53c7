//! Size strings of the CLI flags (`Size::from_str`) and their rendering: a parsed size,
//! rendered, parses back to the same bytes, or (for a rendering with decimals) not at all.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::size::{Size, human};

fn renders_faithfully(size: Size) {
    let rendered = human(size.bytes());
    match rendered.parse::<Size>() {
        Ok(back) => assert_eq!(back, size, "{rendered}"),
        Err(_) => assert!(rendered.contains('.'), "{rendered} does not parse"),
    }
    let bytes = format!("{}B", size.bytes());
    assert_eq!(bytes.parse::<Size>(), Ok(size));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(size) = String::from_utf8_lossy(data).parse::<Size>() {
        renders_faithfully(size);
    }
    if let Some(word) = data.get(..8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        renders_faithfully(Size(u64::from_le_bytes(b)));
    }
});
