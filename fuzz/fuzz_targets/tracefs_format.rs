//! tracefs `events/<category>/<name>/format` files (`field_layout`): the fuzzer's text as it
//! is, and a format file rendered the kernel's way from fields the fuzzer picks, whose layouts
//! must come back exactly.
#![no_main]

use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use oomguard::bpf::tracefs::{FieldLayout, field_layout};

/// Every field name the agent asks tracefs about.
const WANTED: [&str; 8] = [
    "id",
    "item",
    "val",
    "root",
    "level",
    "path",
    "pid",
    "common_pid",
];

const TYPES: [&str; 7] = [
    "u64",
    "int",
    "unsigned long",
    "unsigned short",
    "char",
    "__data_loc char[]",
    "const char *",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for name in WANTED {
        if field_layout(&text, name).is_some() {
            assert!(text.contains(name));
        }
    }
    let _ = round_trip(&mut Unstructured::new(data));
});

fn ident(u: &mut Unstructured) -> Result<String> {
    const FIRST: &[u8] = b"abcdefghijklmnopqrstuvwxyz_";
    const REST: &[u8] = b"abcdefghijklmnopqrstuvwxyz_0123456789";
    let mut name = String::from(*u.choose(FIRST)? as char);
    for _ in 0..u.int_in_range(0..=12)? {
        name.push(*u.choose(REST)? as char);
    }
    Ok(name)
}

fn round_trip(u: &mut Unstructured) -> Result<()> {
    let mut fields: Vec<(String, FieldLayout)> = [
        ("common_type", 0, 2),
        ("common_flags", 2, 1),
        ("common_preempt_count", 3, 1),
        ("common_pid", 4, 4),
    ]
    .into_iter()
    .map(|(n, offset, size)| (n.to_string(), FieldLayout { offset, size }))
    .collect();
    let mut text = String::from("name: fuzzed\nID: 1\nformat:\n");
    for (name, l) in &fields {
        text.push_str(&format!(
            "\tfield:int {name};\toffset:{};\tsize:{};\tsigned:1;\n",
            l.offset, l.size
        ));
    }
    text.push('\n');
    for _ in 0..u.int_in_range(0..=8)? {
        let name = ident(u)?;
        let ty = *u.choose(&TYPES)?;
        let array = if u.ratio(1, 4)? {
            format!("[{}]", u.int_in_range(1..=64u32)?)
        } else {
            String::new()
        };
        let layout = FieldLayout {
            offset: u.arbitrary()?,
            size: u.arbitrary()?,
        };
        let signed = u8::from(u.arbitrary::<bool>()?);
        text.push_str(&format!(
            "\tfield:{ty} {name}{array};\toffset:{};\tsize:{};\tsigned:{signed};\n",
            layout.offset, layout.size
        ));
        fields.push((name, layout));
    }
    let names: Vec<String> = fields.iter().map(|(n, _)| format!("REC->{n}")).collect();
    text.push_str(&format!(
        "\nprint fmt: \"{}\", {}\n",
        "%d ".repeat(names.len()),
        names.join(", ")
    ));
    for (name, _) in &fields {
        // The first field of that name is the one found.
        let first = fields.iter().find(|(n, _)| n == name).map(|(_, l)| *l);
        assert_eq!(field_layout(&text, name), first, "{name} in\n{text}");
    }
    Ok(())
}
