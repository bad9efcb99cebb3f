//! Durable identifiers: UUID v4 strings, validated on parse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::{Error, Result};

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $code:literal, $noun:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// Parses a UUID v4 string (any case, hyphenated or not).
            ///
            /// # Errors
            /// A malformed id, or a UUID of another version, is [`Error::InvalidInput`] with
            #[doc = concat!("code `", $code, "`: never a not-found.")]
            pub fn parse(s: &str) -> Result<Self> {
                let trimmed = s.trim();
                match Uuid::try_parse(trimmed) {
                    Ok(u) if u.get_version_num() == 4 => Ok(Self(u)),
                    _ => Err(Error::invalid(
                        $code,
                        format!(concat!("invalid ", $noun, " id {:?}: expected a UUID v4 such as 3f1c2b7e-8d4a-4c1e-9b2f-0a1b2c3d4e5f"), s),
                    )),
                }
            }

            /// The canonical lowercase hyphenated form.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_id!(
    /// The durable id of a sandbox: the record id in every store.
    SandboxId,
    "invalid_sandbox_id",
    "sandbox"
);

uuid_id!(
    /// The durable id of a process run inside a sandbox.
    ProcessId,
    "invalid_process_id",
    "process"
);

impl ProcessId {
    /// The stream client id of this process's log: `sandbox-process:<processId>`.
    pub fn stream_client_id(&self) -> String {
        format!("sandbox-process:{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_normalises_case() {
        let id = SandboxId::parse("3F1C2B7E-8D4A-4C1E-9B2F-0A1B2C3D4E5F").unwrap();
        assert_eq!(id.to_string(), "3f1c2b7e-8d4a-4c1e-9b2f-0a1b2c3d4e5f");
    }

    #[test]
    fn malformed_ids_are_invalid_input_not_not_found() {
        for bad in [
            "",
            "nope",
            "3f1c2b7e-8d4a-1c1e-9b2f-0a1b2c3d4e5f",
            "../etc/passwd",
        ] {
            let e = SandboxId::parse(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_sandbox_id", "{bad}");
            assert!(!e.is_not_found());
        }
        assert_eq!(
            ProcessId::parse("x").unwrap_err().code(),
            "invalid_process_id"
        );
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let id = ProcessId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ProcessId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ProcessId>("\"bad\"").is_err());
        assert_eq!(id.stream_client_id(), format!("sandbox-process:{}", id));
    }
}
