//! What the stores shared by several instances ([`RedisStore`](crate::redis::RedisStore),
//! [`PostgresStore`](crate::postgres::PostgresStore)) have in common: the bytes a response
//! is kept as, lease tokens, and the flights waiting for a release.

#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod backplane;
pub(crate) mod codec;
pub(crate) mod release;
