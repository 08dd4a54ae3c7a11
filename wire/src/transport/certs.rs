//! Enterprise certificates: a CA, appliance/client/admin certificates naming their
//! holder in a URI SAN, revocation lists, and PEM files with private keys at 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

use crate::id::NodeId;

/// What went wrong creating, reading or writing certificates.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CertError {
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file did not hold what was expected.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        what: &'static str,
    },
}

/// Who a certificate names, as the URI SAN `repl://<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// An appliance of the enterprise (peer protocol).
    Appliance(NodeId),
    /// A client (agent) of the client protocol.
    Client(String),
    /// An administrator (client protocol, admin calls allowed).
    Admin(String),
}

impl Identity {
    /// The URI SAN for this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Appliance(id) => format!("repl://appliance/{id}"),
            Identity::Client(name) => format!("repl://client/{name}"),
            Identity::Admin(name) => format!("repl://admin/{name}"),
        }
    }

    /// Parses a URI SAN; `None` if it is not one of ours.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("repl://")?;
        let (kind, name) = rest.split_once('/')?;
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        match kind {
            "appliance" => NodeId::new(name).ok().map(Identity::Appliance),
            "client" if valid_name => Some(Identity::Client(name.to_string())),
            "admin" if valid_name => Some(Identity::Admin(name.to_string())),
            _ => None,
        }
    }
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this time.
    pub not_before: OffsetDateTime,
    /// Not valid after this time.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Who it names.
    pub identity: Identity,
    /// Its serial number (what a CRL lists).
    pub serial: u64,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

/// The enterprise certificate authority.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

fn random_serial() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(OffsetDateTime::now_utc().unix_timestamp_nanos() as u128);
    // Positive and non-zero, as RFC 5280 asks.
    (h.finish() >> 1).max(1)
}

impl CertificateAuthority {
    /// Creates a new self-signed enterprise CA.
    pub fn create(enterprise: &str, validity: Validity) -> Result<CertificateAuthority, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{enterprise} repl enterprise CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(SerialNumber::from(random_serial()));
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority { issuer: Issuer::new(params, key), key_pem, cert_pem: cert.pem() })
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority { issuer, key_pem: key_pem.to_string(), cert_pem: cert_pem.to_string() })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate for `identity`. Appliances also get their id as a DNS SAN,
    /// so a client can name the appliance it dials.
    pub fn issue(&self, identity: &Identity, validity: Validity) -> Result<IssuedCertificate, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.uri());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        if let Identity::Appliance(id) = identity {
            params.subject_alt_names.push(SanType::DnsName(id.as_str().try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            identity: identity.clone(),
            serial,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CRL revoking the given serial numbers; `number` must grow with each new CRL.
    pub fn revocation_list(&self, revoked: &[u64], number: u64) -> Result<String, CertError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: SerialNumber::from(s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Whether a PEM file holds secret material (written 0600) or not (0644).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFile {
    /// A private key: readable by the owner only.
    Secret,
    /// A certificate or CRL.
    Public,
}

impl KeyFile {
    /// Writes `pem` to `path` atomically-enough (create, write, sync) with the mode
    /// this kind of file needs; an existing file is replaced.
    pub fn write(self, path: &Path, pem: &str) -> Result<(), CertError> {
        let mode = match self {
            KeyFile::Secret => 0o600,
            KeyFile::Public => 0o644,
        };
        let err = |source| CertError::File { path: path.display().to_string(), source };
        let _ = std::fs::remove_file(path);
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
        f.write_all(pem.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    }
}

/// Reads a PEM file (certificate, key or CRL) as text; a private key readable by
/// group or others is refused, since anyone could then impersonate its holder.
pub fn read_pem(path: &Path, kind: KeyFile) -> Result<String, CertError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| CertError::File { path: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(err)?;
    if kind == KeyFile::Secret && meta.permissions().mode() & 0o077 != 0 {
        return Err(CertError::Pem {
            path: path.display().to_string(),
            what: "private key is readable by others (want mode 0600)",
        });
    }
    let text = std::fs::read_to_string(path).map_err(err)?;
    if !text.contains("-----BEGIN ") {
        return Err(CertError::Pem { path: path.display().to_string(), what: "no PEM block" });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn identities_round_trip_through_uris() {
        for id in [
            Identity::Appliance(NodeId::new("db1.site-a").expect("valid")),
            Identity::Client("agent-7".into()),
            Identity::Admin("alice".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        assert_eq!(Identity::from_uri("repl://appliance/Bad Name"), None);
        assert_eq!(Identity::from_uri("https://example.org/x"), None);
        assert_eq!(Identity::from_uri("repl://root/x"), None);
    }

    #[test]
    fn ca_reloads_from_pem_and_keys_are_private() {
        let ca = CertificateAuthority::create("acme", Validity::days_from_now(30)).expect("ca");
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let issued = again.issue(&Identity::Admin("bob".into()), Validity::days_from_now(1)).expect("issue");
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
        let dir = tempfile::tempdir().expect("tmp");
        let key = dir.path().join("bob.key");
        KeyFile::Secret.write(&key, &issued.key_pem).expect("write key");
        let mode = std::fs::metadata(&key).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_pem(&key, KeyFile::Secret).expect("read back"), issued.key_pem);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(read_pem(&key, KeyFile::Secret), Err(CertError::Pem { .. })));
        let junk = dir.path().join("junk.pem");
        KeyFile::Public.write(&junk, "not pem").expect("write");
        assert!(matches!(read_pem(&junk, KeyFile::Public), Err(CertError::Pem { .. })));
        assert!(again.revocation_list(&[issued.serial], 1).expect("crl").contains("X509 CRL"));
    }
}
