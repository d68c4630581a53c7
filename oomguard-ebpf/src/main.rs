//! eBPF programs of the oomguard agent, one module per hook.
//!
//! Built by `oomguard/build.rs` through aya-build (`cargo +nightly build --release
//! -Z build-std=core --target bpfel-unknown-none`); the agent embeds the resulting object.
#![no_std]
#![no_main]

mod memcg_events;

// Every fallible step returns a `Result` that the hook entry points discard, so no panic is
// reachable; the verifier would reject the object if one were.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
