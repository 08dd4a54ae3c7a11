use std::fmt;

use serde::{Deserialize, Serialize};

/// A replicated stream: data of one class, with its own per-origin sequence numbers,
/// so a peer that receives only some streams sees no gaps in any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StreamId {
    /// Users, policies, SSO enrollments and topology: synced full-mesh.
    Enterprise,
    /// Short-lived user sessions with an expiry: synced within a site.
    Sessions,
    /// Append-only audit events: sent to audit holders only.
    Audit,
}

impl StreamId {
    /// Every stream, in a fixed order.
    pub const ALL: [StreamId; 3] = [StreamId::Enterprise, StreamId::Sessions, StreamId::Audit];

    /// The stream's one-byte code, as stored in segment headers.
    pub fn code(self) -> u8 {
        match self {
            StreamId::Enterprise => 1,
            StreamId::Sessions => 2,
            StreamId::Audit => 3,
        }
    }

    /// The stream for a one-byte code, if the code is known.
    pub fn from_code(code: u8) -> Option<StreamId> {
        StreamId::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The variant's position in the declaration, which is what serde encodes for it
    /// (no variant has an explicit discriminant).
    pub(crate) fn index(self) -> u32 {
        self as u32
    }

    /// A short lowercase name, used in file names and logs.
    pub fn name(self) -> &'static str {
        match self {
            StreamId::Enterprise => "enterprise",
            StreamId::Sessions => "sessions",
            StreamId::Audit => "audit",
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A collection of records; each lives in exactly one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Collection {
    /// User accounts.
    Users,
    /// Policies applied to users.
    UserPolicies,
    /// Policies applied to computers.
    ComputerPolicies,
    /// Single-sign-on enrollments (a user's credentials for an application).
    SsoEnrollments,
    /// The enterprise topology: sites and appliances.
    Topology,
    /// Active user sessions, each with an expiry.
    Sessions,
    /// Audit events.
    Audit,
    /// Client requests already answered, by idempotency key: a retry (also one sent
    /// to another appliance after a failover) gets the first answer. Expiring records.
    Requests,
    /// The answers of client writes in the enterprise stream, by idempotency key,
    /// written in the same atomic batch as the write they answer (one durable commit
    /// for both): the write is the entry just before the answer, from the same origin.
    /// Expiring records with an empty value.
    WriteAnswers,
}

impl Collection {
    /// Every collection, in a fixed order.
    pub const ALL: [Collection; 9] = [
        Collection::Users,
        Collection::UserPolicies,
        Collection::ComputerPolicies,
        Collection::SsoEnrollments,
        Collection::Topology,
        Collection::Sessions,
        Collection::Audit,
        Collection::Requests,
        Collection::WriteAnswers,
    ];

    /// The variant's position in the declaration, which is what serde encodes for it
    /// (no variant has an explicit discriminant), for encoders written by hand.
    ///
    /// ```
    /// use repl_wire::Collection;
    /// assert_eq!(Collection::Users.index(), 0);
    /// assert_eq!(postcard::to_allocvec(&Collection::Audit).unwrap(), [Collection::Audit.index() as u8]);
    /// ```
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The stream this collection replicates in.
    pub fn stream(self) -> StreamId {
        match self {
            Collection::Sessions | Collection::Requests => StreamId::Sessions,
            Collection::Audit => StreamId::Audit,
            _ => StreamId::Enterprise,
        }
    }

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Collection::Users => "users",
            Collection::UserPolicies => "user-policies",
            Collection::ComputerPolicies => "computer-policies",
            Collection::SsoEnrollments => "sso-enrollments",
            Collection::Topology => "topology",
            Collection::Sessions => "sessions",
            Collection::Audit => "audit",
            Collection::Requests => "requests",
            Collection::WriteAnswers => "write-answers",
        }
    }

    /// The collection with this [`Collection::name`].
    pub fn from_name(name: &str) -> Option<Collection> {
        Collection::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for s in StreamId::ALL {
            assert_eq!(StreamId::from_code(s.code()), Some(s));
        }
        assert_eq!(StreamId::from_code(0), None);
        for c in Collection::ALL {
            assert_eq!(Collection::from_name(c.name()), Some(c));
        }
        assert_eq!(Collection::Sessions.stream(), StreamId::Sessions);
        assert_eq!(Collection::SsoEnrollments.stream(), StreamId::Enterprise);
    }
}
