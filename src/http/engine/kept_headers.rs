//! A leader's request headers, kept past the call that consumes its request.
//!
//! A flight's response is judged against its leader's headers only when it varies (or
//! when a store or a stage keeps it); a plain flight whose response varies on nothing
//! never reads them. Cloning the `HeaderMap` for every flight cost more than anything
//! else the layer did per keyed request (its index, its entries, and a shared copy of
//! every custom name and of every value not yet shared: five allocations for a request of
//! four headers). So a flight without a store or a stage packs them into one buffer, and
//! the map is rebuilt from it the first time it is read.

use std::sync::OnceLock;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// The headers of a request that went into its flight.
#[derive(Default)]
pub(super) struct KeptHeaders {
    map: OnceLock<HeaderMap>,
    packed: OnceLock<Vec<u8>>,
}

impl KeptHeaders {
    /// Keeps `headers`: as a map when they will be read (`read`: a store or a stage reads
    /// them for every flight), else packed. Only the first call keeps anything.
    pub(super) fn keep(&self, headers: &HeaderMap, read: bool) {
        if self.map.get().is_some() || self.packed.get().is_some() {
            return;
        }
        match pack(headers).filter(|_| !read) {
            Some(packed) => _ = self.packed.set(packed),
            None => _ = self.map.set(headers.clone()),
        }
    }

    /// The kept headers, unpacked on the first call.
    ///
    /// # Panics
    ///
    /// If nothing was [kept](Self::keep): a leader keeps its headers before its request
    /// goes into its flight, and only a flight reads them.
    pub(super) fn get(&self) -> &HeaderMap {
        self.map.get_or_init(|| {
            let packed = self
                .packed
                .get()
                .expect("a leader keeps its headers before its request goes into the flight");
            unpack(packed)
        })
    }
}

/// Each header as the length of its name (2 bytes), the length of its value (4 bytes),
/// the name and the value. A value of 4 GiB or more can't be packed, and `keep` then
/// clones the map.
fn pack(headers: &HeaderMap) -> Option<Vec<u8>> {
    // One pass: most requests' headers are short; a long one grows the buffer once or twice.
    let mut packed = Vec::with_capacity(64 * headers.len());
    for (name, value) in headers {
        let name_len = u16::try_from(name.as_str().len()).ok()?;
        let value_len = u32::try_from(value.len()).ok()?;
        packed.extend_from_slice(&name_len.to_le_bytes());
        packed.extend_from_slice(&value_len.to_le_bytes());
        packed.extend_from_slice(name.as_str().as_bytes());
        packed.extend_from_slice(value.as_bytes());
    }
    Some(packed)
}

/// The map of [`pack`]ed headers. A name or value that no longer parses (only one made
/// with `from_maybe_shared_unchecked` from invalid bytes) is left out: a follower that
/// sent it then differs from the leader on it, and is not given a response that varies
/// on it, which is the safe side.
fn unpack(mut packed: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    while let Some((lens, rest)) = packed.split_first_chunk::<6>() {
        let name_len = usize::from(u16::from_le_bytes([lens[0], lens[1]]));
        let value_len = u32::from_le_bytes([lens[2], lens[3], lens[4], lens[5]]) as usize;
        let (name, rest) = rest.split_at(name_len);
        let (value, rest) = rest.split_at(value_len);
        packed = rest;
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("idempotency-key", HeaderValue::from_static("k-1"));
        headers.append("accept-language", HeaderValue::from_static("fr"));
        headers.append("accept-language", HeaderValue::from_static("en;q=0.5"));
        headers.insert("x-empty", HeaderValue::from_static(""));
        headers.insert("x-opaque", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        headers
    }

    #[test]
    fn packed_headers_unpack_to_the_same_map() {
        let kept = KeptHeaders::default();
        kept.keep(&headers(), false);
        assert!(kept.map.get().is_none(), "packed, not cloned");
        assert_eq!(kept.get(), &headers());
        // Repeated values keep their order.
        let languages: Vec<_> = kept.get().get_all("accept-language").iter().collect();
        assert_eq!(languages, ["fr", "en;q=0.5"]);
    }

    #[test]
    fn headers_a_store_reads_are_kept_as_a_map() {
        let kept = KeptHeaders::default();
        kept.keep(&headers(), true);
        assert!(kept.packed.get().is_none());
        assert_eq!(kept.get(), &headers());
    }

    #[test]
    fn only_the_first_headers_are_kept() {
        let kept = KeptHeaders::default();
        kept.keep(&headers(), false);
        kept.keep(&HeaderMap::new(), false);
        assert_eq!(kept.get(), &headers());
        let empty = KeptHeaders::default();
        empty.keep(&HeaderMap::new(), false);
        assert!(empty.get().is_empty());
    }
}
