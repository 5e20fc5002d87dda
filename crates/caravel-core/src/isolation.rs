//! How far a node keeps its tasks apart, what a task may ask of that, and the references to
//! the things a task's files come from (OCI images, shipped working directories).
//!
//! Pure types and parsing: the agent decides a node's level from what the machine allows,
//! the scheduler matches it against what a job asks, the server checks references at
//! submit.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// How isolated a node's tasks are, weakest first. A job that asks for a level runs only
/// on nodes that give at least that much (`JobSpec::isolation`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// Tasks run as the agent's own user and see the machine: an agent that is not root
    /// (or was told `--sandbox off`) can give no more.
    #[default]
    None,
    /// Tasks run as a uid of their tenant, in their own mount, PID, IPC and UTS namespaces,
    /// with no capabilities, `no_new_privs` and the default seccomp filter; but at least one
    /// resource control is missing (a cgroup controller, the disk cap), which the node's
    /// `isolation_missing` names.
    Sandboxed,
    /// `Sandboxed` and every resource control: CPU, memory, process count, devices and the
    /// ephemeral-disk cap. Kubernetes' "restricted" Pod Security Standard, and more.
    Restricted,
}

impl IsolationLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationLevel::None => "none",
            IsolationLevel::Sandboxed => "sandboxed",
            IsolationLevel::Restricted => "restricted",
        }
    }

    pub fn parse(s: &str) -> Result<IsolationLevel, String> {
        match s.trim() {
            "none" => Ok(IsolationLevel::None),
            "sandboxed" => Ok(IsolationLevel::Sandboxed),
            "restricted" => Ok(IsolationLevel::Restricted),
            other => Err(format!(
                "`{other}` is not an isolation level (none, sandboxed, restricted)"
            )),
        }
    }
}

impl std::fmt::Display for IsolationLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a task needs of the node it lands on beyond resources. The server derives it from
/// the job's spec (`JobSpec::needs`); the scheduler's fit check compares it with the
/// node's `Capacity`. Never part of what a user writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NodeNeeds {
    pub isolation: IsolationLevel,
    /// The task runs in an OCI image: the node needs an OCI runtime.
    pub image: bool,
}

impl NodeNeeds {
    pub fn is_none(&self) -> bool {
        *self == NodeNeeds::default()
    }
}

/// The most a reference may be long (Docker's own limit is 255 for the name part).
pub const MAX_IMAGE_REF: usize = 512;

/// Docker Hub, where a reference without a registry points.
pub const DEFAULT_REGISTRY: &str = "registry-1.docker.io";

/// An OCI image reference, `[REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST]`, read the
/// way Docker reads it: a first component with a `.` or `:`, or `localhost`, names the
/// registry; otherwise the image is on Docker Hub, under `library/` when it has no
/// namespace. The tag defaults to `latest` when there is no digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

fn bad_ref(reference: &str, why: &str) -> String {
    format!("`{reference}` is not an image reference: {why}")
}

impl ImageRef {
    pub fn parse(reference: &str) -> Result<ImageRef, String> {
        if reference.is_empty() {
            return Err("an image reference must not be empty".into());
        }
        if reference.len() > MAX_IMAGE_REF {
            return Err(format!(
                "an image reference must be at most {MAX_IMAGE_REF} characters"
            ));
        }
        if reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad_ref(reference, "it contains blanks"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad_ref(reference, "a digest must be sha256:<64 hex>"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad_ref(reference, "a digest must be sha256:<64 hex>"));
                }
                (r, Some(format!("sha256:{}", hex.to_ascii_lowercase())))
            }
            None => (reference, None),
        };
        // A tag is after the last ':' that follows the last '/' (a ':' before it is the
        // registry's port).
        let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad_ref(
                    reference,
                    "a tag is 1 to 128 letters, digits, '_', '.' and '-'",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ if name.contains('/') => (DEFAULT_REGISTRY.to_string(), name.to_string()),
            _ => (DEFAULT_REGISTRY.to_string(), format!("library/{name}")),
        };
        let reg_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !reg_ok {
            return Err(bad_ref(reference, "the registry is not HOST[:PORT]"));
        }
        // Repository components: lowercase letters and digits, separated by '.', '_',
        // '__' or '-'s (the distribution spec's grammar, slightly relaxed).
        let comp_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if !repository.split('/').all(comp_ok) {
            return Err(bad_ref(
                reference,
                "a repository is lowercase letters and digits, separated by '/', '.', '_' or '-'",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A content address, `sha256:<64 lowercase hex>`: how a shipped working directory is
/// named (`JobSpec::workdir`).
pub fn validate_digest(field: &str, d: &str) -> Result<(), ValidationError> {
    let ok = d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be sha256:<64 lowercase hex> (what `caravel submit --workdir` uploads)",
        ))
    }
}

/// The least ephemeral disk a task may be capped at, and the most.
pub const MIN_DISK_BYTES: u64 = 1 << 20;
pub const MAX_DISK_BYTES: u64 = 1 << 50;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_order_and_parse() {
        assert!(IsolationLevel::None < IsolationLevel::Sandboxed);
        assert!(IsolationLevel::Sandboxed < IsolationLevel::Restricted);
        for l in [
            IsolationLevel::None,
            IsolationLevel::Sandboxed,
            IsolationLevel::Restricted,
        ] {
            assert_eq!(IsolationLevel::parse(l.as_str()), Ok(l));
        }
        assert!(IsolationLevel::parse("strict")
            .unwrap_err()
            .contains("none, sandboxed, restricted"));
    }

    #[test]
    fn references_read_as_docker_reads_them() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            (DEFAULT_REGISTRY, "library/busybox", Some("latest"))
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/py:3.11").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/py");
        assert_eq!(r.tag.as_deref(), Some("3.11"));
        assert_eq!(r.reference(), "3.11");
        let r = ImageRef::parse("localhost/x").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "x")
        );
        let r = ImageRef::parse("org/app").unwrap();
        assert_eq!(r.repository, "org/app");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::parse(&format!("reg.io:443/a/b@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), d);
        assert_eq!(r.to_string(), format!("reg.io:443/a/b@{d}"));
        let r = ImageRef::parse(&format!("reg.io/a:v1@{d}")).unwrap();
        assert_eq!(r.reference(), d, "a digest wins over the tag");
    }

    #[test]
    fn bad_references_say_why() {
        for (r, why) in [
            ("", "must not be empty"),
            ("Busybox", "lowercase"),
            ("a b", "blanks"),
            ("x@sha256:12", "64 hex"),
            ("x:", "tag"),
            ("x:-bad", "tag"),
            ("reg.io//x", "lowercase"),
            ("re$g.io/x", "HOST[:PORT]"),
        ] {
            let e = ImageRef::parse(r).unwrap_err();
            assert!(e.contains(why), "{r}: {e}");
        }
        assert!(ImageRef::parse(&"a".repeat(600)).is_err());
    }

    #[test]
    fn digests_are_checked() {
        let ok = format!("sha256:{}", "0f".repeat(32));
        assert!(validate_digest("workdir", &ok).is_ok());
        for bad in ["", "sha256:", "md5:00", &ok.to_uppercase(), &ok[..70]] {
            assert_eq!(
                validate_digest("workdir", bad).unwrap_err().field,
                "workdir"
            );
        }
    }
}
