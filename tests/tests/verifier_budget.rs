//! The verifier's budget: every program of the eBPF object must verify in
//! at most a quarter of the kernel's limit of 1 M processed instructions, so
//! the classifier can grow (more parsing, more ports) without a sudden
//! "program too large" on a kernel whose verifier explores a little more.
//!
//! The count is `bpf_prog_info.verified_insns`, which the kernel fills with
//! the verifier's `insn_processed` — the "processed N insns" line of the
//! verifier log. aya 0.14 asks for the log only when a load fails
//! (`retry_with_verifier_logs` starts with an empty buffer), so a loaded
//! program's count comes from its info instead.

use sbx_net::datapath::{Datapath, DatapathOptions};
use sbx_net_tests::require_root;

/// BPF_COMPLEXITY_LIMIT_INSNS.
const VERIFIER_LIMIT: u32 = 1_000_000;
const BUDGET: u32 = VERIFIER_LIMIT / 4;

#[test]
fn every_program_verifies_within_a_quarter_of_the_limit() {
    require_root();
    let datapath = Datapath::load(&DatapathOptions::default()).expect("load eBPF");
    let counts = datapath.verified_instruction_counts().expect("program info");
    let mut over = Vec::new();
    for (name, count) in &counts {
        let Some(count) = count else {
            eprintln!("skipped: this kernel does not report verified instruction counts (bpf_prog_info.verified_insns, Linux 5.16+)");
            return;
        };
        eprintln!("{name}: {count} instructions processed by the verifier ({:.1} % of the 1 M limit; budget {BUDGET})", f64::from(*count) * 100.0 / f64::from(VERIFIER_LIMIT));
        if *count > BUDGET {
            over.push(format!("{name}: {count}"));
        }
    }
    assert!(over.is_empty(), "over the verifier budget of {BUDGET} processed instructions: {}", over.join(", "));
}
