//! The job secret: what every process of one job holds and strangers do not.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, Result};

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// A shared secret that authenticates the processes of one job to each other.
///
/// Its value never appears in `Debug` or `Display` output (both print `JobSecret(<redacted>)`);
/// the launcher hands it to workers with [`JobSecret::expose_hex`] / [`JobSecret::from_hex`].
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret {
    bytes: Vec<u8>,
}

impl JobSecret {
    /// A secret from raw bytes; at least [`MIN_SECRET_BYTES`] long.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(Error::Setup {
                reason: format!(
                    "job secret has {} bytes, at least {MIN_SECRET_BYTES} are required",
                    bytes.len()
                ),
            });
        }
        Ok(JobSecret { bytes })
    }

    /// A fresh random 32-byte secret from the system's secure random source.
    pub fn generate() -> Result<Self> {
        let mut bytes = vec![0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Setup { reason: "the system random source failed".into() })?;
        Ok(JobSecret { bytes })
    }

    /// Parses the hexadecimal form written by [`JobSecret::expose_hex`].
    pub fn from_hex(text: &str) -> Result<Self> {
        let text = text.trim();
        let invalid = || Error::Setup { reason: "job secret is not valid hexadecimal".into() };
        if !text.len().is_multiple_of(2) {
            return Err(invalid());
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|start| {
                text.get(start..start + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .ok_or_else(invalid)
            })
            .collect::<Result<Vec<u8>>>()?;
        Self::new(bytes)
    }

    /// The secret as lower-case hexadecimal, for handing it to a child process. Treat the
    /// result as the secret itself.
    pub fn expose_hex(&self) -> String {
        self.bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The HMAC-SHA256 key derived from the secret.
    pub(crate) fn hmac_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.bytes)
    }
}

impl Drop for JobSecret {
    fn drop(&mut self) {
        self.bytes.iter_mut().for_each(|byte| *byte = 0);
    }
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(<redacted>)")
    }
}

impl fmt::Display for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let secret = JobSecret::new(vec![0xab; 32]).expect("32 bytes");
        assert_eq!(format!("{secret:?}"), "JobSecret(<redacted>)");
        assert_eq!(format!("{secret}"), "JobSecret(<redacted>)");
        assert!(!format!("{secret:?}{secret}").contains("ab"));
    }

    #[test]
    fn hex_round_trip_and_rejections() {
        let secret = JobSecret::generate().expect("random");
        let copy = JobSecret::from_hex(&secret.expose_hex()).expect("hex");
        assert_eq!(secret, copy);
        assert!(JobSecret::from_hex("abc").is_err());
        assert!(JobSecret::from_hex("zz").is_err());
        assert!(JobSecret::new(vec![1; 8]).is_err());
    }
}
