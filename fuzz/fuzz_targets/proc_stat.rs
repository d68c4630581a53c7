//! `/proc/PID/stat`: the start time (`parse_start_time`), which must survive any comm (the
//! kernel puts it between parentheses unescaped: spaces, `)` and newlines included).
#![no_main]

use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use oomguard::victim::parse_start_time;

fuzz_target!(|data: &[u8]| {
    let _ = parse_start_time(&String::from_utf8_lossy(data));
    let _ = round_trip(&mut Unstructured::new(data));
});

fn round_trip(u: &mut Unstructured) -> Result<()> {
    let comm_len = u.int_in_range(0..=16)?;
    let comm = String::from_utf8_lossy(u.bytes(comm_len)?).replace('\0', "");
    let state = *u.choose(b"RSDZTtXxIKWP")? as char;
    let start: u64 = u.arbitrary()?;
    let mut line = format!("{} ({comm}) {state}", u.arbitrary::<u32>()?);
    // Fields 4 to 21 (ppid .. itrealvalue), some negative.
    for _ in 4..=21 {
        line.push_str(&format!(" {}", u.arbitrary::<i64>()?));
    }
    line.push_str(&format!(" {start}"));
    for _ in 0..u.int_in_range(0..=30)? {
        line.push_str(&format!(" {}", u.arbitrary::<u64>()?));
    }
    line.push('\n');
    assert_eq!(parse_start_time(&line), Some(start), "{line:?}");
    Ok(())
}
