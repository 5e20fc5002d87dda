//! Parsing of human quantities: CPUs ("2", "500m", "1.5"), memory ("4Gi", "512M", "1024")
//! and durations ("30s", "5m", "2h", "1500ms"). Every parser returns a reason a user can read.

/// Upper bounds that reject absurd requests before they reach the scheduler.
pub const MAX_CPU_MILLI: u64 = 1_000_000 * 1000; // one million cores
pub const MAX_MEMORY_BYTES: u64 = 1 << 50; // 1 PiB
pub const MAX_GPUS: u32 = 4096;

/// Parses a CPU amount into millicores. Accepts "2", "0.5", "500m".
pub fn parse_cpu_milli(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty cpu amount".into());
    }
    let milli = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>()
            .map_err(|_| format!("`{s}` is not a cpu amount (use 2, 0.5 or 500m)"))?
    } else {
        let v: f64 = s
            .parse()
            .map_err(|_| format!("`{s}` is not a cpu amount (use 2, 0.5 or 500m)"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("`{s}` is not a non-negative cpu amount"));
        }
        let m = (v * 1000.0).round();
        if m > MAX_CPU_MILLI as f64 {
            return Err(format!("`{s}` cpus is more than any machine has"));
        }
        m as u64
    };
    if milli > MAX_CPU_MILLI {
        return Err(format!("`{s}` cpus is more than any machine has"));
    }
    Ok(milli)
}

/// Parses a memory size into bytes. Accepts binary (Ki, Mi, Gi, Ti) and decimal (K, M, G, T)
/// suffixes, an optional trailing "B", and plain byte counts.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty memory size".into());
    }
    let t2 = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let split = t2
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t2.len());
    let (num, unit) = t2.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}` has unknown unit `{unit}` (use Ki, Mi, Gi, Ti, K, M, G, T)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a memory size (use 512Mi, 4Gi, 1000000)"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 {
        return Err(format!("`{s}` is not a non-negative memory size"));
    }
    if bytes > MAX_MEMORY_BYTES as f64 {
        return Err(format!("`{s}` is more memory than any machine has"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration into milliseconds: "1500ms", "30s", "5m", "2h", "1d" or plain seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (use 90s, 5m, 2h)"))?;
    let mult = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{s}` has unknown unit `{unit}` (use ms, s, m, h, d)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too long a duration"))
}

/// Formats bytes the way `kubectl` shows them: the largest binary unit that keeps an integer.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (u, m) in UNITS {
        if b >= m {
            let v = b as f64 / m as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{}{u}", v.round() as u64)
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{b}")
}

pub fn format_cpu(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu_milli("2").unwrap(), 2000);
        assert_eq!(parse_cpu_milli("0.25").unwrap(), 250);
        assert_eq!(parse_cpu_milli("500m").unwrap(), 500);
        assert!(parse_cpu_milli("-1").is_err());
        assert!(parse_cpu_milli("lots").is_err());
        assert!(parse_cpu_milli("1e12").is_err());
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_bytes("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("1.5Gi").unwrap(), 3 << 29);
        assert!(parse_bytes("4Qi").is_err());
        assert!(parse_bytes("-5Gi").is_err());
        assert!(parse_bytes("99999Ti").is_err());
        assert_eq!(format_bytes(4 << 30), "4Gi");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("5m").unwrap(), 300_000);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert_eq!(parse_duration_ms("7").unwrap(), 7000);
        assert!(parse_duration_ms("soon").is_err());
    }
}
