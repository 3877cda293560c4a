//! One JSON object per result line, built by hand (no serde in the guest).

use alloc::string::String;
use core::fmt::Write;

pub struct Json {
    out: String,
    first: bool,
}

impl Json {
    /// `{"op":"<op>"`…
    pub fn op(op: &str) -> Json {
        let mut j = Json { out: String::from("{"), first: true };
        j.str("op", op);
        j
    }

    /// `{"event":"<event>"`…
    pub fn event(event: &str) -> Json {
        let mut j = Json { out: String::from("{"), first: true };
        j.str("event", event);
        j
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        quote(&mut self.out, key);
        self.out.push(':');
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Json {
        self.key(key);
        quote(&mut self.out, value);
        self
    }

    pub fn num(&mut self, key: &str, value: u64) -> &mut Json {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn hex(&mut self, key: &str, value: u64) -> &mut Json {
        self.key(key);
        let _ = write!(self.out, "\"{value:#x}\"");
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Json {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    pub fn strs<'a>(&mut self, key: &str, values: impl IntoIterator<Item = &'a str>) -> &mut Json {
        self.key(key);
        self.out.push('[');
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            quote(&mut self.out, v);
        }
        self.out.push(']');
        self
    }

    pub fn finish(&mut self) -> String {
        let mut out = core::mem::take(&mut self.out);
        out.push('}');
        out
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
