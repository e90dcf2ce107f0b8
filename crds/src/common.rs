//! Small value types shared by the three kinds: Go-style durations, references to other objects,
//! and the schema helpers that keep the generated CRDs structural and server-side-apply friendly.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every duration field carries in the CRD schema, so the API server rejects `"5 min"`
/// or `"1d"` before any controller sees it. Units are those of Go's `time.ParseDuration` that make
/// sense for fleets: milliseconds to hours.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Lowercase RFC 1123 label: zone names, conduit names.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Lowercase RFC 1123 subdomain: names of other Kubernetes objects.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Lowercase hex SHA-256 digest.
pub const SHA256_HEX_PATTERN: &str = r"^[0-9a-f]{64}$";

/// A duration written the way Kubernetes users write them (`"90s"`, `"1h30m"`, `"2160h"`).
///
/// The original text is kept so that a value read from the API server serialises back unchanged
/// (no spurious diffs in Git or Argo CD); the parsed value is computed once on construction.
#[derive(Clone, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason} (write it like \"90s\", \"15m\" or \"1h30m\")")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    /// The parsed value.
    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration of whole seconds, written in the largest unit that divides it.
    pub fn from_secs(secs: u64) -> Self {
        let text = if secs == 0 {
            "0s".to_string()
        } else if secs.is_multiple_of(3600) {
            format!("{}h", secs / 3600)
        } else if secs.is_multiple_of(60) {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        };
        Self {
            text,
            value: std::time::Duration::from_secs(secs),
        }
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let mut rest = input;
        let mut total = std::time::Duration::ZERO;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| err("missing unit"))?;
            if number_len == 0 {
                return Err(err("expected a number"));
            }
            let (number, after) = rest.split_at(number_len);
            let well_formed = match number.split_once('.') {
                None => true,
                Some((int, frac)) => !int.is_empty() && !frac.is_empty() && !frac.contains('.'),
            };
            if !well_formed {
                return Err(err("bad number"));
            }
            let unit_len = after
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let unit_secs = match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(err("unknown unit (use ms, s, m or h)")),
            };
            let value: f64 = number.parse().map_err(|_| err("bad number"))?;
            let part = std::time::Duration::try_from_secs_f64(value * unit_secs)
                .map_err(|_| err("out of range"))?;
            total = total.checked_add(part).ok_or_else(|| err("out of range"))?;
            rest = next;
        }
        Ok(Self {
            text: input.to_string(),
            value: total,
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({:?})", self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

/// Reads `null` as an empty list. Server-side apply leaves a list as `null` when the last
/// manager owning its items stops applying them, so every list in a status must accept it.
pub fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// Reference to a cert-manager issuer, the same shape cert-manager itself uses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the Issuer (in the DeviceGroup's namespace) or ClusterIssuer.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// `Issuer` or `ClusterIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
    /// API group of the issuer; `cert-manager.io` for the built-in kinds, another group for
    /// external issuers.
    #[serde(default = "default_issuer_group")]
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
}

fn default_issuer_group() -> String {
    "cert-manager.io".to_string()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum IssuerKind {
    #[default]
    Issuer,
    ClusterIssuer,
}

/// A key in a ConfigMap of the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Name of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// A count of devices, as the printer columns and dashboards read it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedCount {
    pub name: String,
    pub count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> f64 {
        s.parse::<Duration>().unwrap().get().as_secs_f64()
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(secs("90s"), 90.0);
        assert_eq!(secs("1h30m"), 5400.0);
        assert_eq!(secs("2160h"), 2160.0 * 3600.0);
        assert_eq!(secs("1.5h"), 5400.0);
        assert_eq!(secs("250ms"), 0.25);
        assert_eq!(secs("0s"), 0.0);
    }

    #[test]
    fn bad_durations_say_what_to_write() {
        for bad in ["", "5", "5 min", "1d", "h", "-5s", "1.2.3s"] {
            let err = bad.parse::<Duration>().unwrap_err();
            assert!(err.to_string().contains("write it like"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_round_trip_their_text() {
        let d: Duration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
        assert_eq!(Duration::from_secs(7200).as_str(), "2h");
        assert_eq!(Duration::from_secs(90).as_str(), "90s");
        assert_eq!(Duration::from_secs(120).as_str(), "2m");
    }

    #[test]
    fn duration_pattern_agrees_with_the_parser() {
        // The schema pattern and the parser must accept the same language, or the API server
        // would store objects the controllers cannot read (or reject ones they could).
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        let corpus = [
            "1s", "10m", "1h0m0s", "0.5s", "100ms", "2160h", "", "5", ".5s", "5.s", "1..5s", "1d",
            "5 m", "-1s", "1h-1m", "1h1", "ms", "1µs", "1us", "3ns", "1.5h30m", "007s",
        ];
        for input in corpus {
            assert_eq!(
                pattern.is_match(input),
                input.parse::<Duration>().is_ok(),
                "pattern and parser disagree on {input:?}"
            );
        }
    }
}
