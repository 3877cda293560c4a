//! The serialized form of a compiled policy's trie entries, as the daemon
//! sends them to the data plane with every sandbox it creates.
//!
//! Each entry's value ([`PolicyValue`]) is written compact, one flat array
//! of numbers: `[any_rule, any_action, learned_until_ns, learned_rule,
//! learned_port, then rule, port, action for each port verdict]`. Spelled
//! out field by field (the derived form: its 8 port slots, zeros and
//! padding included) the values were 16 KB of a create's 24.7 KB line, and
//! reading them most of the data plane's ~0.2 ms parse (`bench lifecycle`).
//!
//! Both forms are read. The derived one is still written, inside
//! [`spelled_out`], for a data plane of an older build (one that does not
//! say `compact_policy_values` in its hello): it reads only that form.

use std::cell::Cell;
use std::fmt;

use sbx_net_common::{PolicyValue, PortVerdict, MAX_PORT_VERDICTS};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

thread_local! {
    /// Set while [`spelled_out`] runs on this thread.
    static SPELLED_OUT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a serialization) with trie values written in the derived,
/// field-by-field form an older data plane reads.
pub fn spelled_out<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SPELLED_OUT.set(self.0);
        }
    }
    let _restore = Restore(SPELLED_OUT.replace(true));
    f()
}

/// Numbers before the port verdicts in the compact form.
const HEAD: usize = 5;

/// One value, written in the form this thread writes.
struct Written<'a>(&'a PolicyValue);

impl Serialize for Written<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if SPELLED_OUT.get() {
            return v.serialize(serializer);
        }
        // A compiled value never has more (see `canonical`); cut short,
        // it would lose verdicts.
        let ports = v.ports.get(..usize::from(v.port_count)).ok_or_else(|| serde::ser::Error::custom("a trie value with more port verdicts than slots"))?;
        let mut seq = serializer.serialize_seq(Some(HEAD + 3 * ports.len()))?;
        seq.serialize_element(&v.any_port.rule_id)?;
        seq.serialize_element(&v.any_port.action)?;
        seq.serialize_element(&v.learned_until_ns)?;
        seq.serialize_element(&v.learned_rule_id)?;
        seq.serialize_element(&v.learned_port)?;
        for p in ports {
            seq.serialize_element(&p.rule_id)?;
            seq.serialize_element(&p.port)?;
            seq.serialize_element(&p.action)?;
        }
        seq.end()
    }
}

/// One value, read from either form.
struct Read(PolicyValue);

impl<'de> Deserialize<'de> for Read {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = PolicyValue;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a trie value: {HEAD} numbers then 3 per port verdict (at most {MAX_PORT_VERDICTS}), or its fields by name")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PolicyValue, A::Error> {
                fn next<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(seq: &mut A, what: &'static str) -> Result<T, A::Error> {
                    seq.next_element()?.ok_or_else(|| de::Error::custom(format_args!("a trie value ends before its {what}")))
                }
                let mut v = PolicyValue::default();
                v.any_port.rule_id = next(&mut seq, "rule id")?;
                v.any_port.action = next(&mut seq, "action")?;
                v.learned_until_ns = next(&mut seq, "learned deadline")?;
                v.learned_rule_id = next(&mut seq, "learned rule id")?;
                v.learned_port = next(&mut seq, "learned port")?;
                while let Some(rule_id) = seq.next_element::<u32>()? {
                    let slot = v.ports.get_mut(usize::from(v.port_count)).ok_or_else(|| de::Error::custom(format_args!("a trie value with more than {MAX_PORT_VERDICTS} port verdicts")))?;
                    *slot = PortVerdict { rule_id, port: next(&mut seq, "verdict's port")?, action: next(&mut seq, "verdict's action")?, _pad: 0 };
                    v.port_count += 1;
                }
                Ok(v)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<PolicyValue, A::Error> {
                let v = PolicyValue::deserialize(de::value::MapAccessDeserializer::new(map))?;
                canonical(&v).map_err(de::Error::custom)?;
                Ok(v)
            }
        }
        deserializer.deserialize_any(Either).map(Read)
    }
}

/// Refuses a value spelled out with what the compact form cannot say (and
/// a compiled policy never holds): more port verdicts than slots, a slot
/// past the count in use, padding that is not zero. So every value read
/// is written again as it was, in either form.
fn canonical(v: &PolicyValue) -> Result<(), &'static str> {
    let count = usize::from(v.port_count);
    if count > MAX_PORT_VERDICTS {
        return Err("a trie value with more port verdicts than slots");
    }
    if v.any_port._pad != [0; 3] || v._pad != 0 || v.ports.iter().any(|p| p._pad != 0) {
        return Err("a trie value whose padding is not zero");
    }
    if v.ports[count..].iter().any(|p| *p != PortVerdict::default()) {
        return Err("a trie value with a port verdict past its count");
    }
    Ok(())
}

/// `#[serde(with = "crate::policy::wire::trie_entries")]` for a compiled
/// policy's `(address, prefix length, value)` entries.
pub mod trie_entries {
    use super::*;

    pub fn serialize<S: Serializer, A: Serialize>(entries: &[(A, u8, PolicyValue)], serializer: S) -> Result<S::Ok, S::Error> {
        struct Entry<'a, A>(&'a (A, u8, PolicyValue));
        impl<A: Serialize> Serialize for Entry<'_, A> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let (address, len, value) = self.0;
                let mut tuple = serializer.serialize_tuple(3)?;
                tuple.serialize_element(address)?;
                tuple.serialize_element(len)?;
                tuple.serialize_element(&Written(value))?;
                tuple.end()
            }
        }
        serializer.collect_seq(entries.iter().map(Entry))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, A: Deserialize<'de>>(deserializer: D) -> Result<Vec<(A, u8, PolicyValue)>, D::Error> {
        let read: Vec<(A, u8, Read)> = Vec::deserialize(deserializer)?;
        Ok(read.into_iter().map(|(address, len, Read(value))| (address, len, value)).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use sbx_net_common::Verdict;

    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Entries {
        #[serde(with = "trie_entries")]
        v4: Vec<(Ipv4Addr, u8, PolicyValue)>,
    }

    fn value(ports: &[(u32, u16, u8)]) -> PolicyValue {
        let mut v = PolicyValue { any_port: Verdict::new(2, 7), learned_until_ns: 99, learned_rule_id: 3, learned_port: 443, ..PolicyValue::default() };
        for (i, &(rule_id, port, action)) in ports.iter().enumerate() {
            v.ports[i] = PortVerdict { rule_id, port, action, _pad: 0 };
        }
        v.port_count = ports.len() as u8;
        v
    }

    #[test]
    fn values_are_written_compact_and_read_back_from_either_form() {
        let entries = Entries { v4: vec![(Ipv4Addr::new(10, 0, 0, 0), 8, value(&[])), (Ipv4Addr::new(192, 0, 2, 1), 32, value(&[(4, 80, 1), (5, 443, 2)]))] };
        let compact = serde_json::to_string(&entries).unwrap();
        assert_eq!(compact, r#"{"v4":[["10.0.0.0",8,[7,2,99,3,443]],["192.0.2.1",32,[7,2,99,3,443,4,80,1,5,443,2]]]}"#);
        assert_eq!(serde_json::from_str::<Entries>(&compact).unwrap(), entries);
        // The derived form, for an older data plane: each value is what
        // that build's derive reads.
        let spelled = spelled_out(|| serde_json::to_value(&entries).unwrap());
        assert_eq!(serde_json::from_value::<PolicyValue>(spelled["v4"][1][2].clone()).unwrap(), entries.v4[1].2);
        assert_eq!(serde_json::from_value::<Entries>(spelled).unwrap(), entries);
        assert_eq!(serde_json::to_string(&entries).unwrap(), compact, "compact again outside spelled_out");
    }

    #[test]
    fn a_malformed_compact_value_is_refused() {
        let read = |v: &str| serde_json::from_str::<Entries>(&format!(r#"{{"v4":[["10.0.0.0",8,{v}]]}}"#));
        assert!(read("[1,2,0,0]").is_err(), "too short");
        assert!(read("[1,2,0,0,0,4,80]").is_err(), "a verdict cut short");
        assert!(read("[1,2,0,0,0,4,80,1,5]").is_err());
        assert!(read("[1,2,0,0,0,4,70000,1]").is_err(), "a port out of range");
        assert!(read("[1,256,0,0,0]").is_err(), "an action out of range");
        let nine = (0..9).map(|i| format!(",{i},{},1", 80 + i)).collect::<String>();
        assert!(read(&format!("[1,2,0,0,0{nine}]")).is_err(), "more verdicts than slots");
        let eight = (0..8).map(|i| format!(",{i},{},1", 80 + i)).collect::<String>();
        assert_eq!(read(&format!("[1,2,0,0,0{eight}]")).unwrap().v4[0].2.port_count, 8);
        assert!(read(r#""deny""#).is_err());
        // Spelled out, only what the compact form can say.
        let spelled = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = spelled_out(|| serde_json::to_value(Entries { v4: vec![(Ipv4Addr::new(10, 0, 0, 0), 8, value(&[(4, 80, 1)]))] }).unwrap());
            edit(&mut v["v4"][0][2]);
            serde_json::from_value::<Entries>(v)
        };
        assert!(spelled(&|_| {}).is_ok());
        assert!(spelled(&|v| v["port_count"] = 9.into()).is_err(), "more than the slots");
        assert!(spelled(&|v| v["ports"][3]["port"] = 22.into()).is_err(), "a verdict past the count");
        assert!(spelled(&|v| v["_pad"] = 1.into()).is_err(), "padding");
        assert!(spelled(&|v| v["ports"][0]["_pad"] = 1.into()).is_err(), "a verdict's padding");
        assert!(spelled(&|v| v["any_port"]["_pad"] = serde_json::json!([0, 1, 0])).is_err(), "the verdict's padding");
    }
}
