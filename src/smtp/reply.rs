//! SMTP replies (RFC 5321 §4.2) carrying RFC 3463 enhanced status codes (RFC 2034).
//!
//! Every reply tenso sends after EHLO has an enhanced code; the greeting and the EHLO
//! reply cannot carry one (RFC 2034 §3). Text never contains CR or LF: multi-line
//! replies are built from separate lines, so a reply can never break the framing.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as "5.1.1"; empty only for the greeting and EHLO.
    pub esc: &'static str,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(code: u16, esc: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            esc,
            lines: vec![text.into()],
        }
    }

    /// A reply without enhanced status code (greeting, EHLO).
    pub fn plain(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            esc: "",
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Serializes with CRLF; CR and LF inside the text are replaced so a reply can
    /// never inject a line of its own.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(|c| c.as_ref()).unwrap_or("");
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if i + 1 < n { b'-' } else { b' ' });
            if !self.esc.is_empty() {
                out.extend_from_slice(self.esc.as_bytes());
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            for b in text.bytes() {
                out.push(if b == b'\r' || b == b'\n' { b' ' } else { b });
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_line(&self) -> String {
        let mut v = Vec::new();
        self.write_to(&mut v);
        String::from_utf8_lossy(&v)
            .trim_end()
            .replace("\r\n", " / ")
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line() {
        let mut v = Vec::new();
        Reply::new(550, "5.1.1", "no such user").write_to(&mut v);
        assert_eq!(v, b"550 5.1.1 no such user\r\n");
        v.clear();
        Reply::plain(250, vec!["a".into(), "SIZE 10".into()]).write_to(&mut v);
        assert_eq!(v, b"250-a\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn text_cannot_inject_lines() {
        let mut v = Vec::new();
        Reply::new(250, "2.0.0", "x\r\n250 y".to_string()).write_to(&mut v);
        assert_eq!(v, b"250 2.0.0 x  250 y\r\n");
    }
}
