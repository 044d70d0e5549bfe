//! The store's SQL: its table, and one statement per call, each made once for the table's
//! name.

/// The table and its index, as [`migrate`](super::PostgresStore::migrate) creates them.
pub(super) fn schema(table: &str) -> String {
    let groups_index = format!("{}_groups_expires_at", unqualified(table));
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    key         bytea       PRIMARY KEY,  -- the 32-byte store key
    response    bytea,                    -- the kept response (the crate's codec); NULL: none
    expires_at  timestamptz,              -- until when the response is kept
    lease_token text,                     -- the instance's token of the last lease
    lease_until timestamptz,              -- the lease is held until then
    fence       bigint      NOT NULL DEFAULT 0,  -- the fencing token of the last lease
    -- when the row may go: past both its response and its lease
    dead_after  timestamptz GENERATED ALWAYS AS (GREATEST(expires_at, lease_until)) STORED,
    wanted      boolean     NOT NULL DEFAULT false  -- another instance waits for the lease
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS wanted boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS {index} ON {table} (dead_after);
CREATE TABLE IF NOT EXISTS {groups} (
    grp         bytea       NOT NULL,  -- the 32-byte key of an HTTP cache group (a URI, a tag)
    key         bytea       NOT NULL,  -- the 32-byte store key of an entry in it
    expires_at  timestamptz NOT NULL,  -- kept until then
    PRIMARY KEY (grp, key)
);
CREATE INDEX IF NOT EXISTS {groups_index} ON {groups} (expires_at);",
        index = index_name(table),
        groups = groups_table(table),
    )
}

/// The table of the HTTP cache's groups, beside the store's.
fn groups_table(table: &str) -> String {
    format!("{table}_groups")
}

fn unqualified(table: &str) -> &str {
    table.rsplit('.').next().unwrap_or(table)
}

fn index_name(table: &str) -> String {
    format!("{}_dead_after", unqualified(table))
}

/// The statements, with the table's name in them.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) lease: String,
    pub(super) lease_one: String,
    pub(super) complete_batch: String,
    pub(super) complete: String,
    pub(super) renew: String,
    pub(super) get: String,
    pub(super) put: String,
    pub(super) held: String,
    pub(super) sweep: String,
    pub(super) remove: String,
    pub(super) add_to_group: String,
    pub(super) take_group: String,
    pub(super) sweep_groups: String,
}

impl Statements {
    pub(super) fn new(table: &str) -> Self {
        let groups = groups_table(table);
        // `$n * interval '1 millisecond'`: durations go as milliseconds (bigint).
        Statements {
            // Takes the leases of the keys `$1` for the tokens `$2` and `$3` ms each, unless
            // a key's lease is held, or (`$4`, the lookup) a live response is kept under it:
            // one statement for a batch of keys (see `batch.rs`), sorted, so that every
            // instance locks rows in the same order. A lease's fencing token is one more
            // than the key's last, and at least the server's clock in microseconds. A key
            // whose lease another instance holds is marked as waited for (`wanted`) by the
            // same statement, so that its release sends a message, and the waiter needs no
            // write of its own queued on the row's lock in front of the release (see
            // `held`). Answers, a row per key in their order, the fence of the lease taken
            // (or NULL) and the kept response, as the statement's snapshot saw it (before
            // the insert).
            //
            // A lease is soft state, so its commit does not wait for the disk
            // (`synchronous_commit` off for this statement's own transaction): a crash of
            // the server may lose the last few hundred milliseconds of leases, which is a
            // lease lost, as when it expires, and the fencing token covers it (a new lease
            // after the restart takes a higher token, from the clock). What is kept is
            // committed by `complete`, durably, and that flush takes the lease's with it.
            lease: format!(
                "WITH input AS (
                    SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[])
                        WITH ORDINALITY AS i(key, token, lease_ms, n)
                ),
                taken AS (
                    INSERT INTO {table} AS s (key, lease_token, lease_until, fence)
                    SELECT key, token, now() + lease_ms * interval '1 millisecond',
                           (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                      FROM input ORDER BY key
                    ON CONFLICT (key) DO UPDATE SET
                        lease_token = CASE WHEN {free} THEN EXCLUDED.lease_token
                                      ELSE s.lease_token END,
                        lease_until = CASE WHEN {free} THEN EXCLUDED.lease_until
                                      ELSE s.lease_until END,
                        fence = CASE WHEN {free} THEN GREATEST(s.fence + 1, EXCLUDED.fence)
                                ELSE s.fence END,
                        wanted = NOT {free}
                    WHERE NOT ($4 AND s.response IS NOT NULL AND s.expires_at > now())
                    RETURNING key, lease_token, fence
                )
                SELECT CASE WHEN t.lease_token = i.token THEN t.fence END AS fence,
                       (SELECT response FROM {table}
                         WHERE key = i.key AND $4 AND response IS NOT NULL
                           AND expires_at > now())
                       AS response,
                       set_config('synchronous_commit', 'off', true) AS commit
                  FROM input i LEFT JOIN taken t ON t.key = i.key
                 ORDER BY i.n",
                free = FREE,
            ),
            // `lease` for one key (`$1`, the token `$2`, `$3` ms, `$4` the lookup), without
            // the arrays, and without locking a row it does not change. PostgreSQL plans
            // a statement at each run of it, and the batch form (arrays unnested with their
            // order, joined back) took longer to plan and run than one row: 400 us against
            // 240 us through sqlx, alone, on the bench's machine. And the batch form's
            // `ON CONFLICT .. DO UPDATE` locks the row whether it changes it or not, until
            // its transaction ends: when four instances asked for a new key at once, the
            // three that lost queued on the row one after another, and the winner's
            // completion queued behind them (1.1-1.4 ms, against 0.3 ms alone).
            //
            // So each step here changes the row only if the statement's snapshot says it
            // should: insert a row that is not there (`ON CONFLICT DO NOTHING`: a row
            // another instance has just inserted is not locked); take a lease that is free
            // (and no live response under the lookup); or mark a held lease as waited for
            // if it is not yet (`wanted`: the release then sends a message). The steps
            // exclude each other on the snapshot; under a concurrent change, PostgreSQL
            // checks a step's condition again on the row as it is then, and skips it if
            // it no longer holds. The answer: the fence of the lease taken, the kept
            // response (as the snapshot saw it), and `waiting`, whether the lease is held
            // by another instance that will send a message at its release (this statement
            // marked it, or the snapshot saw it marked). A row with none of these
            // (another instance's insert or change under way when the snapshot was taken)
            // is asked again: see `LeaseAnswer::settled`.
            lease_one: format!(
                "WITH cur AS (
                    SELECT lease_until, wanted, response, expires_at
                      FROM {table} WHERE key = $1
                ),
                inserted AS (
                    INSERT INTO {table} (key, lease_token, lease_until, fence)
                    SELECT $1, $2, now() + $3 * interval '1 millisecond',
                           (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                     WHERE NOT EXISTS (SELECT 1 FROM cur)
                    ON CONFLICT (key) DO NOTHING
                    RETURNING fence
                ),
                taken AS (
                    UPDATE {table} AS s SET
                        lease_token = $2,
                        lease_until = now() + $3 * interval '1 millisecond',
                        fence = GREATEST(s.fence + 1,
                            (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
                        wanted = false
                     WHERE s.key = $1 AND {FREE}
                       AND NOT ($4 AND s.response IS NOT NULL AND s.expires_at > now())
                    RETURNING s.fence
                ),
                marked AS (
                    UPDATE {table} AS s SET wanted = true
                     WHERE s.key = $1 AND NOT {FREE} AND NOT s.wanted
                       AND NOT ($4 AND s.response IS NOT NULL AND s.expires_at > now())
                    RETURNING 1
                )
                SELECT COALESCE((SELECT fence FROM inserted), (SELECT fence FROM taken))
                       AS fence,
                       (SELECT response FROM cur
                         WHERE $4 AND response IS NOT NULL AND expires_at > now())
                       AS response,
                       EXISTS (SELECT 1 FROM marked)
                       OR EXISTS (SELECT 1 FROM cur s WHERE s.wanted AND NOT {FREE})
                       AS waiting,
                       set_config('synchronous_commit', 'off', true) AS commit"
            ),
            // `complete` for a batch of keys (see `batch.rs`), sorted: keeps the responses
            // `$3` (NULL: none) for `$4` ms each and releases the leases of the tokens `$2`,
            // for each key whose fence is still `$5`; tells the waiting instances on the
            // channel `$6` (with the response, if small). Answers, a row per key in their
            // order, whether it kept, and else the response kept under the key (before
            // this statement).
            complete_batch: format!(
                "WITH input AS (
                    SELECT * FROM unnest($1::bytea[], $2::text[], $3::bytea[], $4::bigint[],
                                         $5::bigint[])
                        WITH ORDINALITY AS i(key, token, response, ttl_ms, fence, n)
                ),
                kept AS (
                    INSERT INTO {table} AS s (key, response, expires_at, fence, lease_token)
                    SELECT key, response,
                           CASE WHEN response IS NULL THEN NULL
                                ELSE now() + ttl_ms * interval '1 millisecond' END,
                           fence, token
                      FROM input ORDER BY key
                    ON CONFLICT (key) DO UPDATE SET
                        response = COALESCE(EXCLUDED.response, s.response),
                        expires_at = CASE WHEN EXCLUDED.response IS NULL THEN s.expires_at
                                     ELSE EXCLUDED.expires_at END,
                        lease_until = CASE WHEN s.lease_token = EXCLUDED.lease_token THEN now()
                                      ELSE s.lease_until END
                    WHERE s.fence = EXCLUDED.fence
                    RETURNING key, wanted
                ),
                told AS (
                    SELECT pg_notify($6, encode(k.key, 'hex') || {carried})::text AS told
                      FROM kept k JOIN input i ON i.key = k.key WHERE k.wanted
                )
                SELECT k.key IS NOT NULL AS kept,
                       (SELECT count(told) FROM told) AS told,
                       CASE WHEN k.key IS NULL THEN
                           (SELECT response FROM {table}
                             WHERE key = i.key AND response IS NOT NULL AND expires_at > now())
                       END AS response
                  FROM input i LEFT JOIN kept k ON k.key = i.key
                 ORDER BY i.n",
                carried = carried("i.response"),
            ),
            // Keeps the response `$3` (if any) for `$4` ms and releases the lease if the token
            // `$2` still holds it, unless a later lease was taken on the key (its fence is no
            // longer `$7`): a stalled leader never replaces what the instance that took over
            // kept. Then tells the waiting instances (`pg_notify`, sent when the statement
            // commits, with the response if it is small: see `carried`), if any said it
            // waits (`wanted`): a notification takes a lock that
            // serializes every notifying commit in the cluster, disk flush included, so a
            // key nobody else waits for sends none. One statement, safe to repeat. Answers
            // whether it kept, and the response kept under the key (before this statement)
            // for the superseded case. A lone completion takes it rather than the batch
            // form (600 us against 300 us, as for `lease_one`).
            complete: format!(
                "WITH kept AS (
                    INSERT INTO {table} AS s (key, response, expires_at, fence)
                    VALUES ($1, $3, CASE WHEN $3::bytea IS NULL THEN NULL
                                    ELSE now() + $4 * interval '1 millisecond' END, $7)
                    ON CONFLICT (key) DO UPDATE SET
                        response = COALESCE(EXCLUDED.response, s.response),
                        expires_at = CASE WHEN EXCLUDED.response IS NULL THEN s.expires_at
                                     ELSE EXCLUDED.expires_at END,
                        lease_until = CASE WHEN s.lease_token = $2 THEN now()
                                      ELSE s.lease_until END
                    WHERE s.fence = $7
                    RETURNING wanted
                ),
                told AS (
                    SELECT pg_notify($5, $6 || {carried})::text AS told FROM kept WHERE wanted
                )
                SELECT EXISTS (SELECT 1 FROM kept) AS kept,
                       (SELECT count(told) FROM told) AS told,
                       (SELECT response FROM {table}
                         WHERE key = $1 AND response IS NOT NULL AND expires_at > now()
                           AND NOT EXISTS (SELECT 1 FROM kept))
                       AS response",
                carried = carried("$3::bytea"),
            ),
            renew: format!(
                "UPDATE {table} SET lease_until = now() + $3 * interval '1 millisecond'
                  WHERE key = $1 AND lease_token = $2 AND lease_until > now()"
            ),
            get: format!(
                "SELECT response FROM {table}
                  WHERE key = $1 AND response IS NOT NULL AND expires_at > now()"
            ),
            put: format!(
                "INSERT INTO {table} AS s (key, response, expires_at)
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE SET
                     response = EXCLUDED.response, expires_at = EXCLUDED.expires_at"
            ),
            // Whether the lease of `$1` is still held, asked by a waiting instance once it
            // listens for the release: its lease statement marked the row `wanted` when it
            // found the lease held, so a release after that sends a message, and a release
            // before this is seen here. A read: nothing queues on the row's lock in front
            // of the release. Against the clock, not `now()`: a release sets the lease's
            // end to its own statement's start.
            held: format!(
                "SELECT 1 FROM {table} WHERE key = $1 AND lease_until > clock_timestamp()"
            ),
            // A batch of dead rows, oldest first, skipping rows another instance's sweep
            // (or a lease) has locked: short transactions, no table lock.
            sweep: format!(
                "DELETE FROM {table} WHERE key IN (
                    SELECT key FROM {table} WHERE dead_after < now()
                     ORDER BY dead_after LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
            // Drops the live response of `$1`, if any: expired now, so that the row goes
            // with the next sweep (its lease and fencing token stay until then).
            remove: format!(
                "UPDATE {table} SET response = NULL, expires_at = now()
                  WHERE key = $1 AND response IS NOT NULL AND expires_at > now()"
            ),
            add_to_group: format!(
                "INSERT INTO {groups} AS g (grp, key, expires_at)
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond')
                 ON CONFLICT (grp, key) DO UPDATE SET
                     expires_at = GREATEST(g.expires_at, EXCLUDED.expires_at)"
            ),
            take_group: format!("DELETE FROM {groups} WHERE grp = $1 RETURNING key"),
            sweep_groups: format!(
                "DELETE FROM {groups} WHERE (grp, key) IN (
                    SELECT grp, key FROM {groups} WHERE expires_at < now()
                     LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        }
    }
}

/// Whether the lease of the row `s` is free: never taken, or past its end.
const FREE: &str = "(s.lease_until IS NULL OR s.lease_until <= now())";

/// The longest response a release message carries: a message's payload is under 8000
/// bytes, and carries the key (64 hex digits), a colon and the response in hex.
pub(super) const CARRIED: usize = 3900;

/// The part of a release message after the key: `:` and the response kept (`response`, an
/// expression), in hex, if there is one of at most [`CARRIED`] bytes; else nothing, and
/// the woken instance looks the key up.
fn carried(response: &str) -> String {
    format!(
        "CASE WHEN octet_length({response}) <= {CARRIED} \
         THEN ':' || encode({response}, 'hex') ELSE '' END"
    )
}

/// Whether `table` is a plain SQL identifier, optionally schema-qualified
/// (`[a-z_][a-z0-9_]*`, each part at most 40 bytes so that the index and channel names
/// derived from it, `_groups_expires_at` the longest, stay within PostgreSQL's 63).
pub(super) fn valid_table(table: &str) -> bool {
    table.split('.').count() <= 2
        && table.split('.').all(|part| {
            let mut bytes = part.bytes();
            matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
                && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
                && part.len() <= 40
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["tower_coalesce_store", "app.store", "_t1"] {
            assert!(valid_table(good), "{good}");
        }
        for bad in [
            "",
            "1t",
            "Store",
            "t; DROP TABLE users",
            "a.b.c",
            "t-1",
            "\"t\"",
            &"t".repeat(41),
        ] {
            assert!(!valid_table(bad), "{bad}");
        }
    }

    #[test]
    fn the_index_is_named_after_the_table_without_its_schema() {
        let schema = schema("app.store");
        assert!(schema.contains("INDEX IF NOT EXISTS store_dead_after ON app.store "));
        assert!(schema.contains(
            "INDEX IF NOT EXISTS store_groups_expires_at ON app.store_groups (expires_at)"
        ));
    }
}
