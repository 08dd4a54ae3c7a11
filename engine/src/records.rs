//! Typed records of the product, each stored in its collection under its own key.
//!
//! The engine stores bytes; these types are the paved path for appliance code. Their
//! encoding is postcard, like everything else the engine writes.

use repl_wire::Collection;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A record type stored in one collection.
pub trait Record: Serialize + DeserializeOwned {
    /// The collection records of this type live in.
    const COLLECTION: Collection;
    /// The record's key within its collection.
    fn key(&self) -> Vec<u8>;
    /// When the record expires (wall-clock ms), if it does.
    fn expires_at_ms(&self) -> Option<u64> {
        None
    }
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Stable id (the directory's object id).
    pub id: String,
    /// Login name.
    pub login: String,
    /// Display name.
    pub display_name: String,
    /// E-mail address.
    pub email: String,
    /// Whether the account is disabled.
    pub disabled: bool,
    /// Group memberships.
    pub groups: Vec<String>,
}

/// A policy applied to users (or a group of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPolicy {
    /// Policy id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Users or groups the policy applies to.
    pub applies_to: Vec<String>,
    /// Settings as name/value pairs.
    pub settings: Vec<(String, String)>,
    /// Evaluation priority (lower first).
    pub priority: u32,
}

/// A policy applied to computers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputerPolicy {
    /// Policy id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Computer names or organisational units it applies to.
    pub applies_to: Vec<String>,
    /// Settings as name/value pairs.
    pub settings: Vec<(String, String)>,
}

/// A user's single-sign-on enrollment for one application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsoEnrollment {
    /// The user's id.
    pub user_id: String,
    /// The application.
    pub application: String,
    /// The login the user has there.
    pub login: String,
    /// Sealed credential material (encrypted by the appliance before storing).
    pub sealed_secret: Vec<u8>,
    /// When it was last changed, wall-clock ms.
    pub updated_ms: u64,
}

/// An active user session, replicated within a site so it survives an appliance failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Session id.
    pub id: String,
    /// The user's id.
    pub user_id: String,
    /// The computer the user logged in on.
    pub computer: String,
    /// The appliance that created it.
    pub appliance: String,
    /// When it was created, wall-clock ms.
    pub created_ms: u64,
    /// When it expires, wall-clock ms.
    pub expires_ms: u64,
}

/// A topology object (site, appliance, enterprise settings), stored as its own record
/// so topology changes replicate like any other enterprise data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyRecord {
    /// `site`, `appliance` or `enterprise`.
    pub kind: String,
    /// The object's immutable id.
    pub id: String,
    /// The object's encoded body.
    pub body: Vec<u8>,
}

fn composite(parts: &[&str]) -> Vec<u8> {
    parts.join("\u{1f}").into_bytes()
}

impl Record for User {
    const COLLECTION: Collection = Collection::Users;
    fn key(&self) -> Vec<u8> {
        self.id.as_bytes().to_vec()
    }
}

impl Record for UserPolicy {
    const COLLECTION: Collection = Collection::UserPolicies;
    fn key(&self) -> Vec<u8> {
        self.id.as_bytes().to_vec()
    }
}

impl Record for ComputerPolicy {
    const COLLECTION: Collection = Collection::ComputerPolicies;
    fn key(&self) -> Vec<u8> {
        self.id.as_bytes().to_vec()
    }
}

impl Record for SsoEnrollment {
    const COLLECTION: Collection = Collection::SsoEnrollments;
    fn key(&self) -> Vec<u8> {
        composite(&[&self.user_id, &self.application])
    }
}

impl Record for Session {
    const COLLECTION: Collection = Collection::Sessions;
    fn key(&self) -> Vec<u8> {
        self.id.as_bytes().to_vec()
    }
    fn expires_at_ms(&self) -> Option<u64> {
        Some(self.expires_ms)
    }
}

impl Record for TopologyRecord {
    const COLLECTION: Collection = Collection::Topology;
    fn key(&self) -> Vec<u8> {
        composite(&[&self.kind, &self.id])
    }
}
