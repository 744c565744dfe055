//! Compiles the BPF program with clang (`-target bpf`); scripts/test.sh installs clang and
//! libbpf-dev when missing.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/udp_nat.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("udp_nat.bpf.o");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let status = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", &multiarch, "-c", src, "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running clang for {src}: {e} (install clang and libbpf-dev: scripts/test.sh does)"
            )
        });
    assert!(status.success(), "clang failed on {src}: {status}");
}
