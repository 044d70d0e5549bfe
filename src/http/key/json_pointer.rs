//! The value at a JSON pointer, found in one pass over the body without building the rest
//! of the document: the fields and items around it are skipped (checked for syntax, not
//! kept), and only the value at the pointer becomes a `serde_json::Value`. For a 90-byte
//! create request this takes the key's cost from a map with every field and string of the
//! body down to the one value.
//!
//! It answers as `serde_json::from_slice::<Value>(body)?.pointer(pointer)` does (tested
//! against it below), with one difference: strings that are skipped are checked for their
//! escapes but not for UTF-8, so a body whose other fields hold invalid UTF-8 still has its
//! key (the handler's own parser refuses such a body anyway).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A JSON pointer split into its reference tokens, `~1` and `~0` unescaped.
#[derive(Debug, Clone)]
pub(super) struct Pointer(Box<[String]>);

impl Pointer {
    /// Splits `pointer` (empty, or starting with `/`).
    pub(super) fn new(pointer: &str) -> Self {
        let tokens = pointer
            .split('/')
            .skip(1)
            .map(|token| token.replace("~1", "/").replace("~0", "~"))
            .collect();
        Pointer(tokens)
    }

    /// The value at this pointer in the JSON document `body`, if `body` is one.
    pub(super) fn find(&self, body: &[u8]) -> Option<Value> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let found = At(&self.0).deserialize(&mut deserializer).ok()?;
        // Like `from_slice`: trailing bytes other than whitespace make the body no JSON.
        deserializer.end().ok()?;
        found
    }
}

/// Reads a value and returns what is at the remaining tokens within it.
struct At<'p>(&'p [String]);

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        match self.0.split_first() {
            None => serde::Deserialize::deserialize(deserializer).map(Some),
            Some((token, rest)) => deserializer.deserialize_any(Step { token, rest }),
        }
    }
}

/// One step down: the member `token` of an object, or the item at index `token` of an
/// array; anything else has nothing at the pointer.
struct Step<'p> {
    token: &'p str,
    rest: &'p [String],
}

impl<'de> Visitor<'de> for Step<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(matches) = map.next_key_seed(IsToken(self.token))? {
            if matches {
                // A member given twice: the last one counts, as in a parsed `Value`.
                found = map.next_value_seed(At(self.rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let index = array_index(self.token);
        let mut found = None;
        for i in 0.. {
            if Some(i) == index {
                match seq.next_element_seed(At(self.rest))? {
                    Some(value) => found = value,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

/// An object member's name compared with a token, without allocating it.
struct IsToken<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for IsToken<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for IsToken<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<bool, E> {
        Ok(name == self.0)
    }
}

/// An array index as RFC 6901 writes it (and `Value::pointer` reads it): digits, without
/// a sign or leading zeros.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parsed(body: &[u8], pointer: &str) -> Option<Value> {
        serde_json::from_slice::<Value>(body)
            .ok()?
            .pointer(pointer)
            .cloned()
    }

    #[test]
    fn finds_what_a_parsed_document_has_at_the_pointer() {
        let body = br#"{"id":"c-1","n":17,"f":1.50,"client":{"id":"c-2","a/b":1,"m~n":2},
            "items":[{"id":"i-0"},{"id":"i-1"}],"dup":1,"dup":"last","e":"\u00e9\"x"}"#;
        for pointer in [
            "",
            "/id",
            "/n",
            "/f",
            "/client",
            "/client/id",
            "/client/a~1b",
            "/client/m~0n",
            "/items/0/id",
            "/items/1/id",
            "/items/2/id",
            "/items/01/id",
            "/items/+1/id",
            "/items/-",
            "/dup",
            "/e",
            "/missing",
            "/id/x",
            "/n/0",
        ] {
            assert_eq!(
                Pointer::new(pointer).find(body),
                parsed(body, pointer),
                "{pointer}"
            );
        }
        for not_json in [
            &b"{\"id\":\"c-1\"} x"[..],
            b"{\"id\":",
            b"",
            b"[1,]",
            b"{\"id\":01}",
            // Member names that are not UTF-8, before the key and after it.
            br#"{"\ud800":1,"id":"c-1"}"#,
            b"{\"\xff\":1,\"id\":\"c-1\"}",
            b"{\"id\":\"c-1\",\"\xc3\":1}",
        ] {
            assert_eq!(parsed(not_json, "/id"), None);
            assert_eq!(Pointer::new("/id").find(not_json), None);
        }
    }

    /// A document of nested objects and arrays, written out with its values.
    fn document() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-c~/]{0,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any document and any pointer made of its likely tokens: the same answer as
        /// parsing the document and following the pointer.
        #[test]
        fn answers_as_value_pointer_does(
            doc in document(),
            tokens in proptest::collection::vec("[a-c~/0-2]{0,2}", 0..4),
        ) {
            let pointer: String = tokens
                .iter()
                .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
                .collect();
            let body = serde_json::to_vec(&doc).unwrap();
            // Against a parse of the same bytes: serde_json reads some floats back a bit off
            // what was written, the same way both times.
            prop_assert_eq!(Pointer::new(&pointer).find(&body), parsed(&body, &pointer));
        }

        /// Any bytes: no panic, and never a value where a parsed document has none.
        #[test]
        fn any_bytes_give_what_a_parse_gives(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (found, parsed) = (Pointer::new("/id").find(&body), parsed(&body, "/id"));
            // The one difference: invalid UTF-8 in a skipped string (see the module docs).
            if parsed.is_some() || std::str::from_utf8(&body).is_ok() {
                prop_assert_eq!(found, parsed);
            }
        }
    }
}
