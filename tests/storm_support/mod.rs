//! The forged delivery report of issue 11: a well-formed RFC 3464 DSN that quotes a
//! Message-ID the attacker chose (in one mail sent through the alias) and names
//! thousands of recipients. Shared by `tests/dsn_storm.rs` and `benches/dsn_storm.rs`
//! (plain std, no test kit).
#![allow(dead_code)]

/// Recipients `u0000@evil.test`, … (`n` of them); `real` puts a genuine destination
/// at the given position.
pub fn storm_recipients(n: usize, real: Option<(usize, &str)>) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("u{i:04}@evil.test")).collect();
    if let Some((pos, addr)) = real {
        v[pos] = addr.to_string();
    }
    v
}

/// A DSN to `to` about the message `<message_id>`, one failed group per recipient,
/// each with `diagnostic` (which may hold anything, escape sequences included).
pub fn forged_dsn(
    to: &str,
    message_id: &str,
    recipients: &[String],
    diagnostic: &str,
    token: &str,
) -> Vec<u8> {
    let boundary = format!("{token}.storm/evil.test");
    let mut groups = String::with_capacity(recipients.len() * 160);
    for r in recipients {
        groups.push_str(&format!(
            "Final-Recipient: rfc822; {r}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
             Remote-MTA: dns; mx.evil.test\r\nDiagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        ));
    }
    format!(
        "From: MAILER-DAEMON@evil.test (Mail Delivery System)\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         To: {to}\r\n\
         Date: Tue,  3 Mar 2026 10:00:05 +0000\r\n\
         Message-Id: <{token}@evil.test>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         Your message could not be delivered.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; mx.evil.test\r\n\
         \r\n\
         {groups}\
         --{boundary}\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n\
         From: someone@origin.test\r\n\
         To: {to}\r\n\
         Subject: bait\r\n\
         Message-ID: <{message_id}>\r\n\
         \r\n\
         --{boundary}--\r\n"
    )
    .into_bytes()
}
