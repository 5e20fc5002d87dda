//! PostgreSQL backend: the same tables as SQLite (key columns next to a JSON body), for a
//! control plane whose state lives on a database server instead of the server's disk.
//!
//! Two things differ from SQLite and shape this file:
//!
//! - **One owner.** SQLite's file sits in a data directory the server locks; a database
//!   server can be reached from anywhere. The store takes a session-level advisory lock
//!   (keyed by the schema it uses) before it reads or writes anything and keeps it for the
//!   life of its connection, so a second Caravel server on the same schema is refused —
//!   and if the connection is lost, so is the lock, and nothing more is written through it.
//! - **Round trips.** A commit is one statement with at most one change per table: the
//!   batch is folded to the final state per key first (later puts win, a usage record is
//!   kept only the first time), then sent as arrays through `unnest`, every table's change
//!   a CTE of one prepared statement. A commit is one round trip, whether it submits one
//!   job or places ten thousand tasks.
//!
//! `postgres::Client` blocks on a private tokio runtime, which must not be entered from
//! inside another runtime (the server calls the store from its request handlers). The
//! connection therefore lives on a thread of its own and every call is a message to it.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use caravel_core::{JobId, RunId, RunRecord, ServiceRecord, Tenant, UsageRecord};
use postgres::{Client, NoTls};
use serde::de::DeserializeOwned;

use std::sync::Arc;

use crate::{
    from_json, to_json, Lease, Mutation, Result, Snapshot, Store, StoreError, UsageFilter,
};

const SCHEMA_VERSION: i32 = 2;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (id BIGINT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE nodes (id BIGINT PRIMARY KEY, name TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE jobs (id BIGINT PRIMARY KEY, tenant BIGINT NOT NULL, state TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE tasks (job BIGINT NOT NULL, idx BIGINT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (job, idx));
CREATE TABLE runs (id BIGINT PRIMARY KEY, job BIGINT NOT NULL, active BOOLEAN NOT NULL, preempted_for BIGINT, body TEXT NOT NULL);
CREATE INDEX runs_job ON runs(job);
CREATE INDEX runs_active ON runs(id) WHERE active;
CREATE INDEX runs_preempted_for ON runs(preempted_for) WHERE preempted_for IS NOT NULL;
CREATE TABLE usage (run BIGINT PRIMARY KEY, tenant BIGINT NOT NULL, job BIGINT NOT NULL, body TEXT NOT NULL);
CREATE INDEX usage_tenant ON usage(tenant);
CREATE INDEX usage_job ON usage(job);
CREATE TABLE services (tenant BIGINT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, name));
"#,
    // Hashes of the pool's own tokens (admin, agent), so that a standby accepts them.
    r#"
CREATE TABLE caravel_secrets (name TEXT PRIMARY KEY, hash TEXT NOT NULL);
"#,
];

/// How long `open` keeps trying for the lock before it reports the holder: a server that
/// was just killed leaves its session for the database to notice, which takes a moment.
const LOCK_WAIT: Duration = Duration::from_secs(5);

type Call = Box<dyn FnOnce(&mut Conn) + Send>;

pub struct PgStore {
    calls: Option<mpsc::Sender<Call>>,
    thread: Option<JoinHandle<()>>,
    lease: Arc<Lease>,
}

/// How long after its last successful round trip a server still answers as owner, and
/// how long a server that takes the lock waits before it answers (see `Lease`). A
/// failover therefore takes at least this long; an owner whose session was ended behind
/// its back stops answering within it.
pub const LEASE: Duration = Duration::from_secs(2);
/// An idle connection is pinged this often, so the lease is renewed without writes.
const PING_EVERY: Duration = Duration::from_millis(400);

fn db(e: postgres::Error) -> StoreError {
    match e.code() {
        // No SQLSTATE: the socket failed or the connection is closed. Class 08: connection
        // exceptions; 57P0x: the server is shutting down or terminated this session.
        None => StoreError::Unavailable(e.to_string()),
        Some(c) if c.code().starts_with("08") || c.code().starts_with("57P0") => {
            StoreError::Unavailable(e.to_string())
        }
        Some(c) if c.code().starts_with("23") => StoreError::Constraint(
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()),
        ),
        _ => StoreError::Db(match e.as_db_error() {
            Some(d) => d.message().to_string(),
            None => e.to_string(),
        }),
    }
}

fn bodies<T: DeserializeOwned>(table: &'static str, rows: Vec<postgres::Row>) -> Result<Vec<T>> {
    rows.iter()
        .map(|r| from_json(table, r.get::<_, &str>(0)))
        .collect()
}

/// Who holds a store, as the holder wrote it down when it took the lock.
fn describe_holder(c: &mut Client) -> String {
    let row = c
        .query_opt(
            "SELECT CASE WHEN to_regclass('caravel_owner') IS NULL THEN NULL
                    ELSE (SELECT 'pid ' || pid || ' on ' || host || ', since ' || since
                          FROM caravel_owner WHERE id = 1) END",
            &[],
        )
        .ok()
        .flatten();
    match row.and_then(|r| r.get::<_, Option<String>>(0)) {
        Some(who) => format!("another caravel server holds this store ({who})"),
        None => "another caravel server holds this store".to_string(),
    }
}

fn lock_and_migrate(c: &mut Client, owner: &str, wait: Option<Duration>) -> Result<()> {
    let deadline = wait.map(|w| Instant::now() + w);
    // The tables go in the current schema, and the lock is keyed by it: there must be one.
    let schema: Option<String> = c
        .query_one("SELECT current_schema()::text", &[])
        .map_err(db)?
        .get(0);
    if schema.is_none() {
        let path: String = c.query_one("SHOW search_path", &[]).map_err(db)?.get(0);
        return Err(StoreError::Db(format!(
            "the connection's search_path ({path}) names no schema that exists: create it \
             first (CREATE SCHEMA ...) or connect without it"
        )));
    }
    loop {
        let got: bool = c
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('caravel:' || current_schema())::bigint)",
                &[],
            )
            .map_err(db)?
            .get(0);
        if got {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(StoreError::Owned(describe_holder(c)));
        }
        // Standing by (no deadline) polls less often: it waits for a failure, not a race.
        std::thread::sleep(Duration::from_millis(if deadline.is_some() {
            100
        } else {
            500
        }));
    }
    let mut tx = c.transaction().map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS caravel_schema (id INT PRIMARY KEY CHECK (id = 1), version INT NOT NULL);
         CREATE TABLE IF NOT EXISTS caravel_owner (id INT PRIMARY KEY CHECK (id = 1), pid BIGINT NOT NULL, host TEXT NOT NULL, since TEXT NOT NULL, session INT NOT NULL);",
    )
    .map_err(db)?;
    let v: i32 = tx
        .query_opt("SELECT version FROM caravel_schema WHERE id = 1", &[])
        .map_err(db)?
        .map(|r| r.get(0))
        .unwrap_or(0);
    if v > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: v as i64,
            supported: SCHEMA_VERSION as i64,
        });
    }
    for m in MIGRATIONS.iter().skip(v as usize) {
        tx.batch_execute(m).map_err(db)?;
    }
    tx.execute(
        "INSERT INTO caravel_schema (id, version) VALUES (1, $1)
         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
        &[&SCHEMA_VERSION],
    )
    .map_err(db)?;
    tx.execute(
        "INSERT INTO caravel_owner (id, pid, host, since, session)
         VALUES (1, $1, $2, now()::text, pg_backend_pid())
         ON CONFLICT (id) DO UPDATE
         SET pid = EXCLUDED.pid, host = EXCLUDED.host, since = EXCLUDED.since,
             session = EXCLUDED.session",
        &[&(std::process::id() as i64), &owner],
    )
    .map_err(db)?;
    tx.commit().map_err(db)
}

impl PgStore {
    /// Connects (`postgres://user@host:port/db` or `host=... dbname=...`), takes the
    /// store's lock and brings the schema up to date. `owner` names this process for the
    /// error another server gets while this one holds the store (a host name).
    pub fn open(url: &str, owner: &str) -> Result<PgStore> {
        PgStore::open_waiting(url, owner, Some(LOCK_WAIT))
    }

    /// `open`, waiting up to `wait` for the lock (`None`: for as long as it takes — a
    /// standby server that takes over when the owner's session ends).
    pub fn open_waiting(url: &str, owner: &str, wait: Option<Duration>) -> Result<PgStore> {
        let mut cfg: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| StoreError::Db(format!("database URL: {e}")))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        // A half-open connection (the database host vanished) must not hold the server
        // forever: probe it, and give up on it within about a minute.
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(6);
        cfg.application_name("caravel");
        let owner = owner.to_string();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Arc<Lease>>>(1);
        let (calls, rx) = mpsc::channel::<Call>();
        let thread = std::thread::Builder::new()
            .name("caravel-pg".into())
            .spawn(move || {
                let mut client = match cfg.connect(NoTls) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StoreError::Unavailable(format!(
                            "connecting to the database: {e}"
                        ))));
                        return;
                    }
                };
                // The lock dies with the session: have the database notice a vanished
                // owner (machine gone, network cut) within about a minute, not the
                // operating system's two hours, so a standby can take over.
                if let Err(e) = client
                    .batch_execute(
                        "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5;
                         SET tcp_keepalives_count = 6",
                    )
                    .map_err(db)
                    .and_then(|_| lock_and_migrate(&mut client, &owner, wait))
                {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                // Taken just now (after the statement that took it returned: later is
                // the safe side).
                let lease = Arc::new(Lease::new(Instant::now(), LEASE));
                let _ = ready_tx.send(Ok(lease.clone()));
                let mut conn = Conn {
                    client,
                    writes: Default::default(),
                };
                loop {
                    match rx.recv_timeout(PING_EVERY) {
                        Ok(call) => call(&mut conn),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Idle: is the session (and the lock) still ours?
                            let t = Instant::now();
                            match conn.client.simple_query("SELECT 1") {
                                Ok(_) => lease.renew(t),
                                Err(e) if conn.client.is_closed() => {
                                    tracing::error!("the database session that holds this server's lock is gone ({e}): another server may own the store now");
                                    lease.lose();
                                }
                                Err(_) => {}
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                // Dropping the client ends the session, which releases the lock.
            })
            .map_err(|e| StoreError::Db(format!("starting the database thread: {e}")))?;
        let mut s = PgStore {
            calls: Some(calls),
            thread: Some(thread),
            // Replaced by the thread's once the lock is held; never valid meanwhile.
            lease: Arc::new(Lease::new(Instant::now(), LEASE)),
        };
        s.lease.lose();
        match ready_rx.recv() {
            Ok(Ok(lease)) => {
                s.lease = lease;
                Ok(s)
            }
            Ok(Err(e)) => {
                s.close();
                Err(e)
            }
            Err(_) => {
                s.close();
                Err(StoreError::Db("the database thread stopped".into()))
            }
        }
    }

    /// The pool's shared secrets by name: each `(name, hash)` offered is stored unless the
    /// name has one already (the first server's tokens are the pool's); returns what is
    /// stored for every name.
    pub fn shared_secrets(
        &mut self,
        offered: Vec<(String, String)>,
    ) -> Result<BTreeMap<String, String>> {
        self.call(move |c| {
            let (names, hashes): (Vec<String>, Vec<String>) = offered.into_iter().unzip();
            let mut tx = c.transaction().map_err(db)?;
            tx.execute(
                "INSERT INTO caravel_secrets (name, hash)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (name) DO NOTHING",
                &[&names, &hashes],
            )
            .map_err(db)?;
            let rows = tx
                .query("SELECT name, hash FROM caravel_secrets", &[])
                .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn call<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let gone = || StoreError::Unavailable("the database connection is closed".into());
        let (tx, rx) = mpsc::sync_channel(1);
        let lease = self.lease.clone();
        self.calls
            .as_ref()
            .ok_or_else(gone)?
            .send(Box::new(move |c: &mut Conn| {
                // Once the session is gone so is the lock: never open another one behind
                // it. The server reopens the store, which takes the lock again or fails.
                let t = Instant::now();
                let r = if c.is_closed() { Err(gone()) } else { f(c) };
                if c.is_closed() {
                    lease.lose();
                } else if r.is_ok() {
                    lease.renew(t);
                }
                let _ = tx.send(r);
            }))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    fn close(&mut self) {
        self.calls = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PgStore {
    /// Waits for the session to end, so the lock is free when this returns (a server that
    /// reopens its store after an error takes it again at once).
    fn drop(&mut self) {
        self.close();
    }
}

/// A batch folded to what it leaves behind, per table, as column arrays.
#[derive(Default)]
struct Folded {
    tenants: BTreeMap<i64, (String, String, String)>,
    nodes: BTreeMap<i64, (String, String)>,
    jobs: BTreeMap<i64, (i64, String, String)>,
    tasks: BTreeMap<(i64, i64), String>,
    runs: BTreeMap<i64, (i64, bool, Option<i64>, String)>,
    usage: BTreeMap<i64, (i64, i64, String)>,
    /// `None`: deleted.
    services: BTreeMap<(i64, String), Option<String>>,
}

impl Folded {
    fn of(batch: &[Mutation]) -> Folded {
        let mut f = Folded::default();
        for m in batch {
            match m {
                Mutation::PutTenant { tenant, token_hash } => {
                    f.tenants.insert(
                        tenant.id.0 as i64,
                        (tenant.name.clone(), token_hash.clone(), to_json(tenant)),
                    );
                }
                Mutation::PutNode(n) => {
                    f.nodes.insert(n.id.0 as i64, (n.name.clone(), to_json(n)));
                }
                Mutation::PutJob(j) => {
                    f.jobs.insert(
                        j.id.0 as i64,
                        (j.tenant.0 as i64, j.state.as_str().to_string(), to_json(j)),
                    );
                }
                Mutation::PutTask(t) => {
                    f.tasks.insert((t.job.0 as i64, t.index as i64), to_json(t));
                }
                Mutation::PutRun(r) => {
                    f.runs.insert(
                        r.id.0 as i64,
                        (
                            r.job.0 as i64,
                            !r.state.is_terminal(),
                            r.preempted_for.map(|j| j.0 as i64),
                            to_json(r),
                        ),
                    );
                }
                Mutation::InsertUsage(u) => {
                    // Insert-if-absent: within a batch too, the first record stands.
                    f.usage
                        .entry(u.run.0 as i64)
                        .or_insert_with(|| (u.tenant.0 as i64, u.job.0 as i64, to_json(u)));
                }
                Mutation::PutService(r) => {
                    f.services
                        .insert((r.tenant.0 as i64, r.spec.name.clone()), Some(to_json(r)));
                }
                Mutation::DeleteService { tenant, name } => {
                    f.services.insert((tenant.0 as i64, name.clone()), None);
                }
            }
        }
        f
    }

    /// The whole batch as one statement: each table's change is a data-modifying CTE, so
    /// it commits as one implicit transaction in one round trip. Statements are prepared
    /// once per combination of tables a batch touches.
    fn write(self, c: &mut Conn) -> Result<()> {
        let mut w = Write::default();
        if !self.tenants.is_empty() {
            let (ids, rest): (Vec<i64>, Vec<_>) = self.tenants.into_iter().unzip();
            let (names, hashes, bodies) = unzip3(rest);
            w.cte(
                "INSERT INTO tenants (id, name, token_hash, body)
                 SELECT * FROM unnest(?::int8[], ?::text[], ?::text[], ?::text[])
                 ON CONFLICT (id) DO UPDATE
                 SET name = EXCLUDED.name, token_hash = EXCLUDED.token_hash, body = EXCLUDED.body",
                vec![
                    Box::new(ids),
                    Box::new(names),
                    Box::new(hashes),
                    Box::new(bodies),
                ],
            );
        }
        w.next_bit();
        if !self.nodes.is_empty() {
            let (ids, rest): (Vec<i64>, Vec<(String, String)>) = self.nodes.into_iter().unzip();
            let (names, bodies): (Vec<String>, Vec<String>) = rest.into_iter().unzip();
            w.cte(
                "INSERT INTO nodes (id, name, body)
                 SELECT * FROM unnest(?::int8[], ?::text[], ?::text[])
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, body = EXCLUDED.body",
                vec![Box::new(ids), Box::new(names), Box::new(bodies)],
            );
        }
        w.next_bit();
        if !self.jobs.is_empty() {
            let (ids, rest): (Vec<i64>, Vec<_>) = self.jobs.into_iter().unzip();
            let (tenants, states, bodies) = unzip3(rest);
            w.cte(
                "INSERT INTO jobs (id, tenant, state, body)
                 SELECT * FROM unnest(?::int8[], ?::int8[], ?::text[], ?::text[])
                 ON CONFLICT (id) DO UPDATE
                 SET tenant = EXCLUDED.tenant, state = EXCLUDED.state, body = EXCLUDED.body",
                vec![
                    Box::new(ids),
                    Box::new(tenants),
                    Box::new(states),
                    Box::new(bodies),
                ],
            );
        }
        w.next_bit();
        if !self.tasks.is_empty() {
            let (keys, bodies): (Vec<(i64, i64)>, Vec<String>) = self.tasks.into_iter().unzip();
            let (jobs, idxs): (Vec<i64>, Vec<i64>) = keys.into_iter().unzip();
            w.cte(
                "INSERT INTO tasks (job, idx, body)
                 SELECT * FROM unnest(?::int8[], ?::int8[], ?::text[])
                 ON CONFLICT (job, idx) DO UPDATE SET body = EXCLUDED.body",
                vec![Box::new(jobs), Box::new(idxs), Box::new(bodies)],
            );
        }
        w.next_bit();
        if !self.runs.is_empty() {
            let mut ids = Vec::with_capacity(self.runs.len());
            let (mut jobs, mut active, mut pf, mut bodies) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (id, (j, a, p, b)) in self.runs {
                ids.push(id);
                jobs.push(j);
                active.push(a);
                pf.push(p);
                bodies.push(b);
            }
            w.cte(
                "INSERT INTO runs (id, job, active, preempted_for, body)
                 SELECT * FROM unnest(?::int8[], ?::int8[], ?::bool[], ?::int8[], ?::text[])
                 ON CONFLICT (id) DO UPDATE
                 SET job = EXCLUDED.job, active = EXCLUDED.active,
                     preempted_for = EXCLUDED.preempted_for, body = EXCLUDED.body",
                vec![
                    Box::new(ids),
                    Box::new(jobs),
                    Box::new(active),
                    Box::new(pf),
                    Box::new(bodies),
                ],
            );
        }
        w.next_bit();
        if !self.usage.is_empty() {
            let (runs, rest): (Vec<i64>, Vec<_>) = self.usage.into_iter().unzip();
            let (tenants, jobs, bodies) = unzip3(rest);
            w.cte(
                "INSERT INTO usage (run, tenant, job, body)
                 SELECT * FROM unnest(?::int8[], ?::int8[], ?::int8[], ?::text[])
                 ON CONFLICT (run) DO NOTHING",
                vec![
                    Box::new(runs),
                    Box::new(tenants),
                    Box::new(jobs),
                    Box::new(bodies),
                ],
            );
        }
        w.next_bit();
        let (mut put_t, mut put_n, mut put_b) = (Vec::new(), Vec::new(), Vec::new());
        let (mut del_t, mut del_n) = (Vec::new(), Vec::new());
        for ((t, n), b) in self.services {
            match b {
                Some(b) => {
                    put_t.push(t);
                    put_n.push(n);
                    put_b.push(b);
                }
                None => {
                    del_t.push(t);
                    del_n.push(n);
                }
            }
        }
        // Folding left one change per key, so a delete and a put never meet on one row
        // (which the CTEs of one statement, sharing a snapshot, could not order).
        if !del_t.is_empty() {
            w.cte(
                "DELETE FROM services s USING unnest(?::int8[], ?::text[]) AS d(tenant, name)
                 WHERE s.tenant = d.tenant AND s.name = d.name",
                vec![Box::new(del_t), Box::new(del_n)],
            );
        }
        w.next_bit();
        if !put_t.is_empty() {
            w.cte(
                "INSERT INTO services (tenant, name, body)
                 SELECT * FROM unnest(?::int8[], ?::text[], ?::text[])
                 ON CONFLICT (tenant, name) DO UPDATE SET body = EXCLUDED.body",
                vec![Box::new(put_t), Box::new(put_n), Box::new(put_b)],
            );
        }
        w.run(c)
    }
}

type Param = Box<dyn postgres::types::ToSql + Sync + Send>;

/// One statement of data-modifying CTEs, and which of them it has (the cache key).
#[derive(Default)]
struct Write {
    sql: String,
    params: Vec<Param>,
    shape: u16,
    bit: u16,
}

impl Write {
    fn cte(&mut self, template: &str, params: Vec<Param>) {
        self.shape |= 1 << self.bit;
        self.sql
            .push_str(if self.sql.is_empty() { "WITH " } else { ", " });
        self.sql.push_str(&format!("w{} AS (", self.bit));
        for (i, part) in template.split('?').enumerate() {
            if i > 0 {
                self.sql.push_str(&format!("${}", self.params.len() + i));
            }
            self.sql.push_str(part);
        }
        self.sql.push(')');
        self.params.extend(params);
    }

    fn next_bit(&mut self) {
        self.bit += 1;
    }

    fn run(self, c: &mut Conn) -> Result<()> {
        if self.shape == 0 {
            return Ok(());
        }
        let st = match c.writes.get(&self.shape) {
            Some(st) => st.clone(),
            None => {
                let st = c
                    .client
                    .prepare(&format!("{} SELECT 1", self.sql))
                    .map_err(db)?;
                c.writes.insert(self.shape, st.clone());
                st
            }
        };
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = self
            .params
            .iter()
            .map(|p| &**p as &(dyn postgres::types::ToSql + Sync))
            .collect();
        c.client.execute(&st, &refs).map_err(db)?;
        Ok(())
    }
}

/// The connection and what is prepared on it.
struct Conn {
    client: Client,
    writes: std::collections::HashMap<u16, postgres::Statement>,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

fn unzip3<A, B, C>(v: Vec<(A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let (mut a, mut b, mut c) = (
        Vec::with_capacity(v.len()),
        Vec::with_capacity(v.len()),
        Vec::with_capacity(v.len()),
    );
    for (x, y, z) in v {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}

impl Store for PgStore {
    fn lease(&self) -> Option<Arc<Lease>> {
        Some(self.lease.clone())
    }

    fn load(&mut self) -> Result<Snapshot> {
        self.call(|c| {
            // One snapshot of the whole state, not seven moments of it.
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(db)?;
            let mut q = |sql: &str| tx.query(sql, &[]).map_err(db);
            let tenant_rows = q("SELECT body, token_hash FROM tenants ORDER BY id")?;
            let mut tenants = Vec::with_capacity(tenant_rows.len());
            for r in &tenant_rows {
                tenants.push((
                    from_json::<Tenant>("tenants", r.get::<_, &str>(0))?,
                    r.get::<_, String>(1),
                ));
            }
            let max_run_id: i64 = q("SELECT COALESCE(MAX(id), 0) FROM runs")?[0].get(0);
            let snap = Snapshot {
                tenants,
                nodes: bodies("nodes", q("SELECT body FROM nodes ORDER BY id")?)?,
                jobs: bodies("jobs", q("SELECT body FROM jobs ORDER BY id")?)?,
                tasks: bodies("tasks", q("SELECT body FROM tasks ORDER BY job, idx")?)?,
                active_runs: bodies("runs", q("SELECT body FROM runs WHERE active ORDER BY id")?)?,
                max_run_id: max_run_id as u64,
                services: bodies::<ServiceRecord>(
                    "services",
                    q("SELECT body FROM services ORDER BY tenant, name")?,
                )?,
            };
            tx.commit().map_err(db)?;
            Ok(snap)
        })
    }

    fn apply(&mut self, batch: &[Mutation]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let folded = Folded::of(batch);
        self.call(move |c| folded.write(c))
    }

    fn runs_of_job(&mut self, job: JobId) -> Result<Vec<RunRecord>> {
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT body FROM runs WHERE job = $1 ORDER BY id",
                    &[&(job.0 as i64)],
                )
                .map_err(db)?;
            bodies("runs", rows)
        })
    }

    fn ended_runs_preempted_for(&mut self, job: JobId) -> Result<Vec<RunRecord>> {
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT body FROM runs WHERE preempted_for = $1 AND NOT active ORDER BY id",
                    &[&(job.0 as i64)],
                )
                .map_err(db)?;
            bodies("runs", rows)
        })
    }

    fn run(&mut self, id: RunId) -> Result<Option<RunRecord>> {
        self.call(move |c| {
            let row = c
                .query_opt("SELECT body FROM runs WHERE id = $1", &[&(id.0 as i64)])
                .map_err(db)?;
            row.map(|r| from_json("runs", r.get::<_, &str>(0)))
                .transpose()
        })
    }

    fn usage(&mut self, f: &UsageFilter) -> Result<Vec<UsageRecord>> {
        let tenant = f.tenant.map(|t| t.0 as i64);
        let job = f.job.map(|j| j.0 as i64);
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT body FROM usage
                     WHERE ($1::int8 IS NULL OR tenant = $1) AND ($2::int8 IS NULL OR job = $2)
                     ORDER BY run",
                    &[&tenant, &job],
                )
                .map_err(db)?;
            bodies("usage", rows)
        })
    }

    fn has_usage(&mut self, run: RunId) -> Result<bool> {
        self.call(move |c| {
            Ok(
                c.query_opt("SELECT 1 FROM usage WHERE run = $1", &[&(run.0 as i64)])
                    .map_err(db)?
                    .is_some(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{test_pg, PgSchema, StoreFactory};

    struct Pg(PgSchema);

    impl StoreFactory for Pg {
        fn open(&self) -> Box<dyn Store> {
            Box::new(PgStore::open(&self.0.url(), "test").unwrap())
        }
    }

    crate::store_conformance_tests!(|| test_pg().map(|base| Pg(PgSchema::create(&base))));

    /// A second server on the same schema is refused, naming the holder; once the holder
    /// is gone (its session ended), the store opens.
    #[test]
    fn a_store_has_one_owner_at_a_time() {
        let Some(base) = test_pg() else { return };
        let schema = PgSchema::create(&base);
        let first = PgStore::open(&schema.url(), "host-a").unwrap();
        let t0 = Instant::now();
        let err = PgStore::open(&schema.url(), "host-b")
            .err()
            .expect("second owner");
        assert!(t0.elapsed() >= LOCK_WAIT, "gave up before the lock wait");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Owned(_)), "{err:?}");
        assert!(
            msg.contains(&format!("pid {} on host-a", std::process::id())),
            "{msg}"
        );
        drop(first);
        let mut second = PgStore::open(&schema.url(), "host-b").unwrap();
        assert!(second.load().unwrap().jobs.is_empty());
        // Another schema is another store, with its own lock.
        let other = PgSchema::create(&base);
        PgStore::open(&other.url(), "host-c").unwrap();
    }

    #[test]
    fn shared_secrets_keep_the_first_offer() {
        let Some(base) = test_pg() else { return };
        let schema = PgSchema::create(&base);
        let offer = |s: &mut PgStore, admin: &str| {
            s.shared_secrets(vec![("admin".into(), admin.into())])
                .unwrap()
        };
        let mut s = PgStore::open(&schema.url(), "a").unwrap();
        assert_eq!(offer(&mut s, "h1")["admin"], "h1");
        drop(s);
        let mut s = PgStore::open(&schema.url(), "b").unwrap();
        assert_eq!(offer(&mut s, "h2")["admin"], "h1", "the first offer stands");
        let both = s
            .shared_secrets(vec![("agent".into(), "g1".into())])
            .unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(both["agent"], "g1");
    }

    #[test]
    fn refuses_a_newer_schema() {
        let Some(base) = test_pg() else { return };
        let schema = PgSchema::create(&base);
        drop(PgStore::open(&schema.url(), "a").unwrap());
        schema.admin(&format!(
            "UPDATE {}.caravel_schema SET version = 99",
            schema.name()
        ));
        assert!(matches!(
            PgStore::open(&schema.url(), "a").err(),
            Some(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn a_search_path_without_a_schema_is_a_clear_error() {
        let Some(base) = test_pg() else { return };
        let url = format!("{base} options='-c search_path=no_such_schema_here'");
        let e = PgStore::open(&url, "a").err().unwrap().to_string();
        assert!(
            e.contains("search_path (no_such_schema_here) names no schema that exists"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_url_or_an_absent_server_is_a_clear_error() {
        let bad = PgStore::open("postgres://[", "a")
            .err()
            .unwrap()
            .to_string();
        assert!(bad.starts_with("database error: database URL:"), "{bad}");
        // Nothing listens on port 1 of loopback.
        let absent = PgStore::open("host=127.0.0.1 port=1 user=x dbname=x", "a")
            .err()
            .unwrap()
            .to_string();
        assert!(absent.contains("connecting to the database"), "{absent}");
    }
}
