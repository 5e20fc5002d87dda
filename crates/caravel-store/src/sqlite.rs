//! SQLite backend: one file, WAL journal. Records are stored as JSON bodies next to the
//! key columns that queries filter on, which keeps the schema small and the same shape the
//! PostgreSQL backend uses.

use std::path::Path;

use caravel_core::{JobId, RunId, RunRecord, ServiceRecord, Tenant, UsageRecord};
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;

use crate::{from_json, to_json, Mutation, Result, Snapshot, Store, StoreError, UsageFilter};

const SCHEMA_VERSION: i64 = 3;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE nodes (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE jobs (id INTEGER PRIMARY KEY, tenant INTEGER NOT NULL, state TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE tasks (job INTEGER NOT NULL, idx INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (job, idx));
CREATE TABLE runs (id INTEGER PRIMARY KEY, job INTEGER NOT NULL, active INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX runs_job ON runs(job);
CREATE INDEX runs_active ON runs(active) WHERE active = 1;
CREATE TABLE usage (run INTEGER PRIMARY KEY, tenant INTEGER NOT NULL, job INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX usage_tenant ON usage(tenant);
CREATE INDEX usage_job ON usage(job);
"#,
    r#"
CREATE TABLE services (tenant INTEGER NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, name));
"#,
    // The job a run was stopped for, as a key column: a restarted server looks up the
    // victims of each waiting job. Filled in from the bodies of runs stored before.
    r#"
ALTER TABLE runs ADD COLUMN preempted_for INTEGER;
UPDATE runs SET preempted_for = json_extract(body, '$.preempted_for');
CREATE INDEX runs_preempted_for ON runs(preempted_for) WHERE preempted_for IS NOT NULL;
"#,
];

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Survives a crash of the server process (kill -9) at any moment; the last commits may
    /// be lost on power failure. SQLite's recommended setting for WAL.
    Normal,
    /// Also survives power failure: fsync on every commit.
    Full,
}

pub struct SqliteStore {
    conn: Connection,
}

fn db(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Constraint(msg.clone().unwrap_or_else(|| e.to_string()))
        }
        _ => StoreError::Db(e.to_string()),
    }
}

/// The database holds every job's spec, secrets included, and the token hashes: it and its
/// WAL files are readable by their owner only (SQLite gives the WAL and shared-memory files
/// the mode of the database file, so creating that one 0600 covers them).
fn private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let mut names = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        names.push(p.into());
    }
    for p in names {
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

impl SqliteStore {
    pub fn open(path: &Path, sync: Sync) -> Result<SqliteStore> {
        private(path).map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(
            None,
            "synchronous",
            match sync {
                Sync::Normal => "NORMAL",
                Sync::Full => "FULL",
            },
        )
        .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        let mut s = SqliteStore { conn };
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&mut self) -> Result<()> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        let tx = self.conn.transaction().map_err(db)?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            tx.execute_batch(m).map_err(db)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    fn all<T: DeserializeOwned>(&self, table: &'static str, sql: &str) -> Result<Vec<T>> {
        let mut st = self.conn.prepare_cached(sql).map_err(db)?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(from_json(table, &r.map_err(db)?)?);
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Snapshot> {
        let mut tenants = Vec::new();
        {
            let mut st = self
                .conn
                .prepare("SELECT body, token_hash FROM tenants ORDER BY id")
                .map_err(db)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(db)?;
            for r in rows {
                let (b, h) = r.map_err(db)?;
                tenants.push((from_json::<Tenant>("tenants", &b)?, h));
            }
        }
        let max_run_id: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM runs", [], |r| r.get(0))
            .map_err(db)?;
        Ok(Snapshot {
            tenants,
            nodes: self.all("nodes", "SELECT body FROM nodes ORDER BY id")?,
            jobs: self.all("jobs", "SELECT body FROM jobs ORDER BY id")?,
            tasks: self.all("tasks", "SELECT body FROM tasks ORDER BY job, idx")?,
            active_runs: self.all("runs", "SELECT body FROM runs WHERE active = 1 ORDER BY id")?,
            max_run_id: max_run_id as u64,
            services: self.all::<ServiceRecord>(
                "services",
                "SELECT body FROM services ORDER BY tenant, name",
            )?,
        })
    }

    fn apply(&mut self, batch: &[Mutation]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(db)?;
        for m in batch {
            match m {
                Mutation::PutTenant { tenant, token_hash } => {
                    tx.prepare_cached(
                        "INSERT INTO tenants (id, name, token_hash, body) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(id) DO UPDATE SET name = ?2, token_hash = ?3, body = ?4",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            tenant.id.0 as i64,
                            tenant.name,
                            token_hash,
                            to_json(tenant)
                        ])
                    })
                    .map_err(db)?;
                }
                Mutation::PutNode(n) => {
                    tx.prepare_cached(
                        "INSERT INTO nodes (id, name, body) VALUES (?1, ?2, ?3)
                         ON CONFLICT(id) DO UPDATE SET name = ?2, body = ?3",
                    )
                    .and_then(|mut s| s.execute(params![n.id.0 as i64, n.name, to_json(n)]))
                    .map_err(db)?;
                }
                Mutation::PutJob(j) => {
                    tx.prepare_cached(
                        "INSERT INTO jobs (id, tenant, state, body) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(id) DO UPDATE SET tenant = ?2, state = ?3, body = ?4",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            j.id.0 as i64,
                            j.tenant.0 as i64,
                            j.state.as_str(),
                            to_json(j)
                        ])
                    })
                    .map_err(db)?;
                }
                Mutation::PutTask(t) => {
                    tx.prepare_cached(
                        "INSERT INTO tasks (job, idx, body) VALUES (?1, ?2, ?3)
                         ON CONFLICT(job, idx) DO UPDATE SET body = ?3",
                    )
                    .and_then(|mut s| s.execute(params![t.job.0 as i64, t.index, to_json(t)]))
                    .map_err(db)?;
                }
                Mutation::PutRun(r) => {
                    tx.prepare_cached(
                        "INSERT INTO runs (id, job, active, preempted_for, body)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT(id) DO UPDATE
                         SET job = ?2, active = ?3, preempted_for = ?4, body = ?5",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            r.id.0 as i64,
                            r.job.0 as i64,
                            !r.state.is_terminal() as i64,
                            r.preempted_for.map(|j| j.0 as i64),
                            to_json(r)
                        ])
                    })
                    .map_err(db)?;
                }
                Mutation::PutService(r) => {
                    tx.prepare_cached(
                        "INSERT INTO services (tenant, name, body) VALUES (?1, ?2, ?3)
                         ON CONFLICT(tenant, name) DO UPDATE SET body = ?3",
                    )
                    .and_then(|mut s| {
                        s.execute(params![r.tenant.0 as i64, r.spec.name, to_json(r)])
                    })
                    .map_err(db)?;
                }
                Mutation::DeleteService { tenant, name } => {
                    tx.prepare_cached("DELETE FROM services WHERE tenant = ?1 AND name = ?2")
                        .and_then(|mut s| s.execute(params![tenant.0 as i64, name]))
                        .map_err(db)?;
                }
                Mutation::InsertUsage(u) => {
                    tx.prepare_cached(
                        "INSERT INTO usage (run, tenant, job, body) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(run) DO NOTHING",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            u.run.0 as i64,
                            u.tenant.0 as i64,
                            u.job.0 as i64,
                            to_json(u)
                        ])
                    })
                    .map_err(db)?;
                }
            }
        }
        tx.commit().map_err(db)
    }

    fn runs_of_job(&mut self, job: JobId) -> Result<Vec<RunRecord>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT body FROM runs WHERE job = ?1 ORDER BY id")
            .map_err(db)?;
        let rows = st
            .query_map([job.0 as i64], |r| r.get::<_, String>(0))
            .map_err(db)?;
        rows.map(|r| from_json("runs", &r.map_err(db)?)).collect()
    }

    fn ended_runs_preempted_for(&mut self, job: JobId) -> Result<Vec<RunRecord>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT body FROM runs WHERE preempted_for = ?1 AND active = 0 ORDER BY id",
            )
            .map_err(db)?;
        let rows = st
            .query_map([job.0 as i64], |r| r.get::<_, String>(0))
            .map_err(db)?;
        rows.map(|r| from_json("runs", &r.map_err(db)?)).collect()
    }

    fn run(&mut self, id: RunId) -> Result<Option<RunRecord>> {
        let b: Option<String> = self
            .conn
            .query_row("SELECT body FROM runs WHERE id = ?1", [id.0 as i64], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db)?;
        b.map(|b| from_json("runs", &b)).transpose()
    }

    fn usage(&mut self, f: &UsageFilter) -> Result<Vec<UsageRecord>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT body FROM usage WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR job = ?2)
                 ORDER BY run",
            )
            .map_err(db)?;
        let rows = st
            .query_map(
                params![f.tenant.map(|t| t.0 as i64), f.job.map(|j| j.0 as i64)],
                |r| r.get::<_, String>(0),
            )
            .map_err(db)?;
        rows.map(|r| from_json("usage", &r.map_err(db)?)).collect()
    }

    fn has_usage(&mut self, run: RunId) -> Result<bool> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM usage WHERE run = ?1",
                [run.0 as i64],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod private_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_database_and_its_wal_are_owner_only_even_if_they_were_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("caravel.db");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(SqliteStore::open(&p, Sync::Normal).unwrap());
        assert_eq!(mode(&p), 0o600);
        // A database left world-readable by an older version is tightened on open.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = SqliteStore::open(&p, Sync::Normal).unwrap();
        assert_eq!(mode(&p), 0o600);
        let wal = d.path().join("caravel.db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600);
        }
        drop(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::StoreFactory;

    struct Sqlite(tempfile::TempDir);

    impl StoreFactory for Sqlite {
        fn open(&self) -> Box<dyn Store> {
            Box::new(SqliteStore::open(&self.0.path().join("state.db"), Sync::Normal).unwrap())
        }
    }

    crate::store_conformance_tests!(|| Some(Sqlite(tempfile::tempdir().unwrap())));

    /// A database written before the `preempted_for` column (schema 2) gets it filled in
    /// from the run bodies, so a server upgraded mid-preemption still finds the victims.
    #[test]
    fn upgrading_from_schema_2_fills_in_who_each_run_was_stopped_for() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.db");
        let mut victim = crate::conformance::run(4, 1, caravel_core::RunState::Killed);
        victim.preempted_for = Some(JobId(9));
        {
            let c = Connection::open(&p).unwrap();
            for m in &MIGRATIONS[..2] {
                c.execute_batch(m).unwrap();
            }
            c.pragma_update(None, "user_version", 2).unwrap();
            c.execute(
                "INSERT INTO runs (id, job, active, body) VALUES (4, 1, 0, ?1)",
                [to_json(&victim)],
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&p, Sync::Normal).unwrap();
        assert_eq!(s.ended_runs_preempted_for(JobId(9)).unwrap(), vec![victim]);
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.db");
        {
            let c = Connection::open(&p).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            SqliteStore::open(&p, Sync::Normal),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}
