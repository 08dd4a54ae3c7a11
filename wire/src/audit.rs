use serde::{Deserialize, Serialize};

/// An audit event as the application reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When it happened, wall-clock milliseconds.
    pub time_ms: u64,
    /// The user it concerns.
    pub user: String,
    /// The appliance that recorded it.
    pub appliance: String,
    /// What happened (`login`, `logout`, `policy-change`, ...).
    pub action: String,
    /// Free-form detail.
    pub detail: String,
}
