//! The bytes a stored response is kept as in a shared store (Redis, PostgreSQL).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

use crate::BoxError;
use crate::store::{Fingerprint, StoredResponse};

const MAGIC: &[u8; 4] = b"TCR1";

/// `TCR1`, status (u16), version (u8), fingerprint (32 bytes), header count (u32), each
/// header as name length (u16), name, value length (u32), value, then the body. Integers
/// are big-endian.
pub(crate) fn encode(response: &StoredResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(response.weight());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&response.status().as_u16().to_be_bytes());
    out.push(match response.version() {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    });
    out.extend_from_slice(response.fingerprint().as_bytes());
    out.extend_from_slice(&(response.headers().len() as u32).to_be_bytes());
    for (name, value) in response.headers() {
        out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(response.body());
    out
}

/// Reads what [`encode`] wrote; anything else is an error, never a panic.
pub(crate) fn decode(bytes: &[u8]) -> Result<StoredResponse, BoxError> {
    let mut input = Reader(bytes);
    if input.take(4)? != MAGIC {
        return Err("not a stored response (bad magic)".into());
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(input.array()?))?;
    let version = match input.array::<1>()?[0] {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => Version::HTTP_11,
    };
    let fingerprint = Fingerprint::from_bytes(input.array()?);
    let count = u32::from_be_bytes(input.array()?);
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let len = u16::from_be_bytes(input.array()?) as usize;
        let name = HeaderName::from_bytes(input.take(len)?)?;
        let len = u32::from_be_bytes(input.array()?) as usize;
        let value = HeaderValue::from_bytes(input.take(len)?)?;
        headers.append(name, value);
    }
    let body = Bytes::copy_from_slice(input.0);
    Ok(StoredResponse::new(
        status,
        version,
        headers,
        body,
        fingerprint,
    ))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BoxError> {
        if self.0.len() < n {
            return Err("stored response is truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BoxError> {
        Ok(self.take(N)?.try_into().expect("took exactly N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        StoredResponse::new(
            StatusCode::CREATED,
            Version::HTTP_2,
            headers,
            Bytes::from_static(b"{\"id\":\"c-1\"}"),
            Fingerprint::from_bytes([7; 32]),
        )
    }

    fn assert_round_trip(original: &StoredResponse) {
        let decoded = decode(&encode(original)).unwrap();
        assert_eq!(decoded.status(), original.status());
        assert_eq!(decoded.version(), original.version());
        assert_eq!(decoded.headers(), original.headers());
        assert_eq!(decoded.body(), original.body());
        assert_eq!(decoded.fingerprint(), original.fingerprint());
    }

    #[test]
    fn responses_survive_the_round_trip() {
        assert_round_trip(&sample());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = encode(&sample());
        // The body is the tail, so only cuts before it must fail.
        let body_start = bytes.len() - sample().body().len();
        for cut in 0..body_start {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
        for i in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[i] ^= 0xff;
            let _ = decode(&corrupt); // must not panic
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn response() -> impl Strategy<Value = StoredResponse> {
            let header = (
                "[a-z][a-z0-9-]{0,20}",
                proptest::collection::vec(any::<u8>(), 0..40),
            );
            (
                100u16..1000,
                0u8..5,
                any::<[u8; 32]>(),
                proptest::collection::vec(header, 0..8),
                proptest::collection::vec(any::<u8>(), 0..256),
            )
                .prop_map(|(status, version, fingerprint, headers, body)| {
                    let mut map = HeaderMap::new();
                    for (name, value) in headers {
                        if let Ok(value) = HeaderValue::from_bytes(&value) {
                            map.append(HeaderName::try_from(name).unwrap(), value);
                        }
                    }
                    let version = [
                        Version::HTTP_09,
                        Version::HTTP_10,
                        Version::HTTP_11,
                        Version::HTTP_2,
                        Version::HTTP_3,
                    ][usize::from(version)];
                    StoredResponse::new(
                        StatusCode::from_u16(status).unwrap(),
                        version,
                        map,
                        Bytes::from(body),
                        Fingerprint::from_bytes(fingerprint),
                    )
                })
        }

        proptest! {
            #[test]
            fn any_response_survives_the_round_trip(original in response()) {
                assert_round_trip(&original);
            }

            /// What Redis hands back may be anything (another app's key, a truncated
            /// write): an error or a response, never a panic. (Nothing is allocated by a
            /// count read from the bytes: each header must bring its own bytes.)
            #[test]
            fn any_bytes_decode_without_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..512),
                with_magic in any::<bool>(),
            ) {
                let mut input = Vec::new();
                if with_magic {
                    input.extend_from_slice(MAGIC);
                }
                input.extend_from_slice(&bytes);
                let _ = decode(&input);
            }
        }
    }
}
