//! BTF (`Btf::parse`) and every lookup the agent makes in it (`offsets::from_btf`), plus the
//! lookups by the names the blob itself holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oomguard::bpf::{btf::Btf, offsets::from_btf};

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let _ = from_btf(&btf);
    // Names from anywhere in the blob: the string section is among them.
    let names: Vec<String> = data
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty() && s.len() < 64)
        .take(16)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    for a in &names {
        let _ = btf.struct_size(a);
        let _ = btf.enum_value(a);
        let _ = btf.has_typedef(a);
        for b in names.iter().take(8) {
            let _ = btf.member(a, b);
        }
    }
    for id in 0..64 {
        let _ = btf.type_size(id);
    }
});
