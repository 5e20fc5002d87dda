//! Bearer tokens. The admin and agent tokens live in the data directory (mode 0600) — and,
//! on PostgreSQL, as SHA-256 hashes in the database, so every server on it (a standby)
//! accepts them; tenant tokens are shown once at creation and stored only as hashes.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// 256 random bits, hex, with a prefix that says what kind of secret it is.
pub fn new_token(prefix: &str) -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS has randomness");
    format!("{prefix}_{}", hex::encode(b))
}

pub fn hash_token(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

/// Compares without leaking where the first difference is.
pub fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the token file, creating it with mode 0600 on first start.
pub fn load_or_create(path: &Path, prefix: &str) -> std::io::Result<String> {
    if let Some(t) = read_token(path)? {
        return Ok(t);
    }
    let t = new_token(prefix);
    write_token(path, &t)?;
    Ok(t)
}

/// The token in `path`; None if there is no such file (or it is empty).
pub fn read_token(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `t` to `path` (mode 0600), atomically.
pub fn write_token(path: &Path, t: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(t.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Agent,
    Tenant(caravel_core::TenantId),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn token_file_is_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin.token");
        let a = load_or_create(&p, "cvadm").unwrap();
        let b = load_or_create(&p, "cvadm").unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with("cvadm_") && a.len() == 6 + 64);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn hashes_and_compares() {
        assert_ne!(hash_token("a"), hash_token("b"));
        assert!(ct_eq("abc", "abc"));
        assert!(!ct_eq("abc", "abd"));
        assert!(!ct_eq("abc", "ab"));
    }
}
