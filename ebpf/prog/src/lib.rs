#![no_std]
//! Empty library so userspace/build.rs can name this crate as a build
//! dependency (cargo then rebuilds userspace when it changes); the program
//! itself is the `sbx-net-ebpf` binary.
