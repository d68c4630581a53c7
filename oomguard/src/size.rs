//! Size strings as the upstream agent takes them: a bare number means MiB (`--max-margin=30`),
//! or a number with a unit suffix (`512K`, `30M`, `1G`, `30Mi`, `4096B`).

use std::fmt;

use thiserror::Error;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?} is empty")]
    Empty(String),
    #[error("size {0:?} is not a number with an optional unit (K, M, G, T, Ki, Mi, Gi, Ti, B)")]
    Malformed(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Size {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(SizeError::Empty(s.to_string()));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(SizeError::Malformed(s.to_string()));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| SizeError::Overflow(s.to_string()))?;
        let mult = match unit.trim() {
            // Upstream convention: a bare number is MiB.
            "" => MIB,
            "B" | "b" => 1,
            "K" | "k" | "Ki" | "KiB" | "KB" => KIB,
            "M" | "m" | "Mi" | "MiB" | "MB" => MIB,
            "G" | "g" | "Gi" | "GiB" | "GB" => GIB,
            "T" | "t" | "Ti" | "TiB" | "TB" => TIB,
            _ => return Err(SizeError::Malformed(s.to_string())),
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| SizeError::Overflow(s.to_string()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_bytes(self.0, f)
    }
}

/// Renders bytes with the largest binary unit that divides them evenly, else in MiB with
/// two decimals.
pub fn human(bytes: u64) -> String {
    Size(bytes).to_string()
}

fn fmt_bytes(b: u64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (unit, m) in [("Ti", TIB), ("Gi", GIB), ("Mi", MIB)] {
        if b >= m && b.is_multiple_of(m) {
            return write!(f, "{}{}", b / m, unit);
        }
    }
    if b >= MIB {
        write!(f, "{:.2}Mi", b as f64 / MIB as f64)
    } else if b >= KIB && b.is_multiple_of(KIB) {
        write!(f, "{}Ki", b / KIB)
    } else {
        write!(f, "{b}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<u64, SizeError> {
        s.parse::<Size>().map(Size::bytes)
    }

    #[test]
    fn bare_number_is_mebibytes_like_upstream() {
        assert_eq!(p("30"), Ok(30 * MIB));
        assert_eq!(p("1"), Ok(MIB));
    }

    #[test]
    fn suffixes() {
        assert_eq!(p("512K"), Ok(512 * KIB));
        assert_eq!(p("30M"), Ok(30 * MIB));
        assert_eq!(p("30Mi"), Ok(30 * MIB));
        assert_eq!(p("1G"), Ok(GIB));
        assert_eq!(p("2Gi"), Ok(2 * GIB));
        assert_eq!(p("4096B"), Ok(4096));
        assert_eq!(p(" 7M "), Ok(7 * MIB));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(p(""), Err(SizeError::Empty(_))));
        assert!(matches!(p("M"), Err(SizeError::Malformed(_))));
        assert!(matches!(p("-1"), Err(SizeError::Malformed(_))));
        assert!(matches!(p("1.5G"), Err(SizeError::Malformed(_))));
        assert!(matches!(p("10X"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            p("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(p("99999999999T"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn renders_readably() {
        assert_eq!(human(20 * MIB), "20Mi");
        assert_eq!(human(GIB), "1Gi");
        assert_eq!(human(1536 * KIB), "1.50Mi");
        assert_eq!(human(512 * KIB), "512Ki");
        assert_eq!(human(100), "100B");
    }
}
