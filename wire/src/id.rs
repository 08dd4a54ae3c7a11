use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::limits::NODE_ID_BYTES_MAX;

/// The random 64-bit identity an appliance draws at its first start and again at
/// every restore from backup. Origins in dots and version vectors are incarnations,
/// so a restored appliance can never reuse a sequence number it handed out before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The topology's name for an appliance (an `ApplianceId` in the design): a short
/// DNS-like label of lowercase letters, digits, `-` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NodeId(String);

/// Why a string is not a valid [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NodeIdError {
    /// Empty, or longer than [`NODE_ID_BYTES_MAX`].
    #[error("appliance id must be 1 to {NODE_ID_BYTES_MAX} bytes, got {0}")]
    Length(usize),
    /// A character outside `a-z 0-9 - .`, or a leading/trailing `-`/`.`.
    #[error("appliance id {0:?} may hold only a-z, 0-9, '-' and '.', and must start and end with a letter or digit")]
    Character(String),
}

impl NodeId {
    /// Validates and wraps an appliance id.
    ///
    /// ```
    /// # use repl_wire::NodeId;
    /// assert!(NodeId::new("db1.site-a").is_ok());
    /// assert!(NodeId::new("Bad Id").is_err());
    /// ```
    pub fn new(id: impl Into<String>) -> Result<Self, NodeIdError> {
        let id = id.into();
        if id.is_empty() || id.len() > NODE_ID_BYTES_MAX {
            return Err(NodeIdError::Length(id.len()));
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !id.chars().all(allowed) || !edge_ok(id.chars().next()) || !edge_ok(id.chars().last()) {
            return Err(NodeIdError::Character(id));
        }
        Ok(NodeId(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        NodeId::new(raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_rules() {
        assert!(NodeId::new("a").is_ok());
        assert!(NodeId::new("site1-db2").is_ok());
        assert_eq!(NodeId::new(""), Err(NodeIdError::Length(0)));
        assert!(matches!(NodeId::new("-a"), Err(NodeIdError::Character(_))));
        assert!(matches!(NodeId::new("a."), Err(NodeIdError::Character(_))));
        assert!(matches!(NodeId::new("A"), Err(NodeIdError::Character(_))));
        assert!(NodeId::new("x".repeat(NODE_ID_BYTES_MAX)).is_ok());
        assert!(NodeId::new("x".repeat(NODE_ID_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn node_id_decode_validates() {
        let bytes = postcard::to_allocvec(&"Not Valid".to_string()).expect("encoding a string cannot fail");
        assert!(postcard::from_bytes::<NodeId>(&bytes).is_err());
    }
}
