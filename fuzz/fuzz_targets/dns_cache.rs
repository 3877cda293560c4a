#![no_main]
//! The DNS answer cache's wire reader: any upstream bytes as an answer to
//! a fixed query. Never panics; a layout it accepts has its TTL fields
//! inside the message and a lifetime of at least a second; what is stored
//! comes back the same length, with the query's id, and TTLs never larger
//! than stored.
use sbx_net::dns::cache::{answer_layout, AnswerCache, CacheSettings};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let layout = answer_layout(data, 300);
    if let Some(l) = &layout {
        assert!(l.keep_seconds >= 1);
        assert!(l.ttl_offsets.iter().all(|at| at + 4 <= data.len()));
    }
    // The query the answer is checked against: its own question (the
    // first name, when it is plain), RD, no EDNS.
    let Some(qname_len) = layout.as_ref().map(|l| l.qname_len) else { return };
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(&data[12..12 + qname_len]);
    query.extend_from_slice(&data[12 + qname_len..12 + qname_len + 4]);
    let cache = AnswerCache::new(CacheSettings { entries: 4, negative_max_ttl: 300 });
    if cache.put(&query, data, 0) {
        let hit = cache.get(&query, 500_000_000).expect("a stored answer is served within its lifetime");
        assert_eq!(hit.len(), data.len());
        assert_eq!(&hit[..2], &[0x12, 0x34]);
        for at in &layout.as_ref().map(|l| l.ttl_offsets.clone()).unwrap_or_default() {
            let before = u32::from_be_bytes(data[*at..at + 4].try_into().unwrap());
            let after = u32::from_be_bytes(hit[*at..at + 4].try_into().unwrap());
            assert!(after <= before);
        }
    }
});
