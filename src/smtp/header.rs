//! Reading RFC 5322 header sections: find the end of the header, iterate unfolded
//! fields. Read-only helpers; nothing here rewrites a message.

/// The header section of a message (up to, not including, the empty line).
pub fn header_section(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &[];
    }
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &msg[..p + 2],
        None => msg,
    }
}

/// Iterates unfolded header fields as (lowercase name, value).
pub fn fields(headers: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    let text = String::from_utf8_lossy(headers).into_owned();
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    out.into_iter()
}

/// Header fields with their byte span in `headers`: (start, end, name, unfolded
/// value); `end` includes the field's last CRLF.
pub fn fields_raw(headers: &[u8]) -> Vec<(usize, usize, String, String)> {
    let mut out: Vec<(usize, usize, String, String)> = Vec::new();
    let mut pos = 0;
    while pos < headers.len() {
        let end = headers[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(headers.len(), |p| pos + p + 2);
        let line = String::from_utf8_lossy(&headers[pos..end]);
        let text = line.trim_end_matches("\r\n");
        if text.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1 = end;
                last.3.push(' ');
                last.3.push_str(text.trim());
            }
        } else if let Some((name, value)) = text.split_once(':') {
            out.push((pos, end, name.trim().to_string(), value.trim().to_string()));
        }
        pos = end;
    }
    out
}

pub fn count_fields(headers: &[u8], name: &str) -> usize {
    fields(headers).filter(|(n, _)| n == name).count()
}

pub fn field_values(headers: &[u8], name: &str) -> Vec<String> {
    fields(headers)
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let m = b"Received: a\r\n b\r\nreceived: c\r\nDelivered-To: x@y\r\n\r\nReceived: body\r\n";
        let h = header_section(m);
        assert_eq!(count_fields(h, "received"), 2);
        assert_eq!(field_values(h, "delivered-to"), vec!["x@y"]);
        assert_eq!(header_section(b"\r\nbody"), b"");
    }
}
