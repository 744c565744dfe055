#!/usr/bin/env bash
# Installs from Debian's packages, when missing, what building tether needs beyond the Rust
# toolchain (clang and libbpf-dev: crates/offload/build.rs compiles the UDP offload's BPF
# program), plus any packages named as arguments. As root, or through sudo.
set -euo pipefail

need=("$@")
command -v clang >/dev/null 2>&1 || need+=(clang)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
