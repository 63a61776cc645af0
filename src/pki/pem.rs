//! PEM reading and writing with the strictness a CA needs: malformed blocks are errors, not
//! silently skipped.

use super::Error;

/// Parses every PEM block in `text`. Text outside blocks (comments, `openssl x509 -text`
/// output) is ignored, as OpenSSL and Go do; a damaged block is an error.
pub fn parse_all(text: &str) -> Result<Vec<pem::Pem>, Error> {
    pem::parse_many(text).map_err(|e| Error::Pem(e.to_string()))
}

/// Returns the DER of every `CERTIFICATE` block in `text`, in order. Errors when there is none.
pub fn certificates(text: &str) -> Result<Vec<Vec<u8>>, Error> {
    let certs: Vec<Vec<u8>> = parse_all(text)?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(Error::MissingBlock {
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// Returns the DER of the first `CERTIFICATE REQUEST` (or legacy `NEW CERTIFICATE REQUEST`)
/// block in `text`.
pub fn csr(text: &str) -> Result<Vec<u8>, Error> {
    if let Some(der) = single_block_fast(text, "CERTIFICATE REQUEST") {
        return Ok(der);
    }
    parse_all(text)?
        .into_iter()
        .find(|b| matches!(b.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"))
        .map(pem::Pem::into_contents)
        .ok_or(Error::MissingBlock {
            expected: "CERTIFICATE REQUEST",
        })
}

/// Fast path for the common case on the signing path: `text` is exactly one block with `tag`
/// (surrounding whitespace allowed). Anything else returns `None` and goes through the full
/// parser, which also produces the precise error.
fn single_block_fast(text: &str, tag: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let t = text.trim();
    let body = t
        .strip_prefix("-----BEGIN ")?
        .strip_prefix(tag)?
        .strip_prefix("-----")?;
    let body = body
        .strip_suffix("-----")?
        .strip_suffix(tag)?
        .strip_suffix("-----END ")?;
    // Line by line, straight into the output: every line but the last holds a whole number of
    // base64 quanta and no padding. Anything else (headers, odd wrapping, stray characters)
    // fails here and is left to the full parser.
    let mut out = Vec::with_capacity(body.len() / 4 * 3);
    let mut padded = false;
    for line in body.split('\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if padded || line.len() % 4 != 0 {
            return None;
        }
        padded = line.ends_with('=');
        base64::engine::general_purpose::STANDARD
            .decode_vec(line, &mut out)
            .ok()?;
    }
    Some(out)
}

/// Encodes DER as one PEM block (RFC 7468: 64-character lines) with LF line endings and a
/// trailing newline. Written directly into one buffer: every response on the signing path
/// carries one.
pub fn encode(tag: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * tag.len() + 34);
    out.push_str("-----BEGIN ");
    out.push_str(tag);
    out.push_str("-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        // Base64 is ASCII, so every index is a character boundary.
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(tag);
    out.push_str("-----\n");
    out
}

/// Encodes a certificate as a PEM block.
pub fn encode_cert(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

/// Concatenates certificates into one PEM text, in order.
pub fn encode_certs<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(encode_cert).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_requires_a_block() {
        assert!(matches!(
            certificates("just text\n"),
            Err(Error::MissingBlock {
                expected: "CERTIFICATE"
            })
        ));
    }

    #[test]
    fn damaged_block_is_an_error() {
        let text = "-----BEGIN CERTIFICATE-----\n!!!notbase64\n-----END CERTIFICATE-----\n";
        assert!(matches!(certificates(text), Err(Error::Pem(_))));
    }

    #[test]
    fn fast_path_agrees_with_the_parser() {
        let text = encode(
            "CERTIFICATE REQUEST",
            b"hello csr bytes, long enough to wrap the base64 lines",
        );
        assert_eq!(
            single_block_fast(&text, "CERTIFICATE REQUEST"),
            Some(b"hello csr bytes, long enough to wrap the base64 lines".to_vec())
        );
        assert_eq!(
            csr(&text).unwrap(),
            b"hello csr bytes, long enough to wrap the base64 lines".to_vec()
        );
        // Headers, other tags or two blocks fall back to the full parser.
        assert_eq!(
            single_block_fast(&format!("{text}{text}"), "CERTIFICATE REQUEST"),
            None
        );
        assert_eq!(
            single_block_fast(&text.replace("REQUEST", "REQ"), "CERTIFICATE REQUEST"),
            None
        );
        assert!(matches!(
            csr("-----BEGIN CERTIFICATE REQUEST-----\n%%%\n-----END CERTIFICATE REQUEST-----\n"),
            Err(Error::Pem(_))
        ));
    }

    /// Whatever the fast path accepts, it decodes exactly as the pem crate does; what it
    /// declines, the full parser handles.
    #[test]
    fn fast_path_matches_the_pem_crate_on_any_wrapping() {
        use base64::Engine as _;
        let tag = "CERTIFICATE REQUEST";
        for len in [1usize, 2, 3, 47, 48, 49, 57, 96, 97, 300, 601] {
            let der: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
            for width in [4usize, 60, 64, 76, 1000] {
                for eol in ["\n", "\r\n"] {
                    let lines: Vec<&str> = b64
                        .as_bytes()
                        .chunks(width)
                        .map(|c| std::str::from_utf8(c).unwrap())
                        .collect();
                    let text = format!(
                        "-----BEGIN {tag}-----{eol}{}{eol}-----END {tag}-----{eol}",
                        lines.join(eol)
                    );
                    assert_eq!(
                        single_block_fast(&text, tag),
                        Some(der.clone()),
                        "{len} bytes, {width} per line"
                    );
                    assert_eq!(pem::parse(&text).unwrap().contents(), der.as_slice());
                }
            }
            // Lines that are not whole quanta, or padding before the end: declined, and the
            // full parser decides.
            if b64.len() > 6 {
                let odd = format!(
                    "-----BEGIN {tag}-----\n{}\n{}\n-----END {tag}-----\n",
                    &b64[..3],
                    &b64[3..]
                );
                assert_eq!(single_block_fast(&odd, tag), None, "{len}");
                assert_eq!(csr(&odd).unwrap(), der, "{len}");
            }
        }
        let early_pad = format!("-----BEGIN {tag}-----\nAA==\nAAAA\n-----END {tag}-----\n");
        assert_eq!(single_block_fast(&early_pad, tag), None);
        let header =
            format!("-----BEGIN {tag}-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END {tag}-----\n");
        assert_eq!(single_block_fast(&header, tag), None);
    }

    #[test]
    fn encode_round_trips() {
        let text = encode_certs([&b"abc"[..], &b"defg"[..]]);
        assert_eq!(
            certificates(&text).unwrap(),
            vec![b"abc".to_vec(), b"defg".to_vec()]
        );
        assert!(text.ends_with("-----END CERTIFICATE-----\n"));
    }

    #[test]
    fn encoding_is_the_pem_crates() {
        for len in [0, 1, 2, 3, 47, 48, 49, 96, 97, 500, 1234] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let reference = pem::encode_config(
                &pem::Pem::new("CERTIFICATE", der.clone()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            );
            assert_eq!(encode("CERTIFICATE", &der), reference, "{len} bytes");
        }
    }
}
