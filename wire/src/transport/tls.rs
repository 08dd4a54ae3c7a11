//! Hand-built rustls configurations for quinn, verifiers that check identities, and
//! endpoint helpers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    SupportedCipherSuite,
};
use thiserror::Error;

use super::certs::Identity;
use crate::error::DecodeError;
use crate::id::NodeId;
use crate::message::{ALPN_CLIENT, ALPN_PEER};

/// A connection with no traffic for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive pings keep an idle but healthy connection open.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// Errors of the transport.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A TLS configuration or handshake error.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The connection could not be started.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// A frame or message did not decode.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A socket could not be bound.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// PEM input did not hold what was expected.
    #[error("bad {what}")]
    Pem {
        /// What was being read.
        what: &'static str,
    },
    /// The peer authenticated but may not use this protocol.
    #[error("{identity:?} is not allowed on {alpn}")]
    NotAuthorized {
        /// Who the certificate named.
        identity: Option<Identity>,
        /// The protocol negotiated.
        alpn: String,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended mid-frame")]
    Truncated,
}

impl TransportError {
    /// The TLS alert that ended the connection, and how it ended, when the handshake
    /// failed over a certificate on either side (ours refused: revoked, expired, from
    /// another CA, not allowed; or the peer's refused here). QUIC carries a TLS alert
    /// as the transport error code 0x100 plus the alert. Retrying the same peer cannot
    /// help until a certificate changes.
    pub fn certificate_alert(&self) -> Option<(u8, &quinn::ConnectionError)> {
        let lost = match self {
            TransportError::Connection(c)
            | TransportError::Write(quinn::WriteError::ConnectionLost(c))
            | TransportError::Read(quinn::ReadError::ConnectionLost(c)) => c,
            _ => return None,
        };
        let code = match lost {
            quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
            quinn::ConnectionError::TransportError(t) => t.code,
            _ => return None,
        };
        let alert = u8::try_from(u64::from(code).checked_sub(0x100)?).ok()?;
        CERTIFICATE_ALERTS.iter().any(|(a, _)| *a == alert).then_some((alert, lost))
    }
}

/// TLS alerts about a certificate, with their names in RFC 8446 section 6.2.
const CERTIFICATE_ALERTS: [(u8, &str); 8] = [
    (42, "bad_certificate"),
    (43, "unsupported_certificate"),
    (44, "certificate_revoked"),
    (45, "certificate_expired"),
    (46, "certificate_unknown"),
    (48, "unknown_ca"),
    (49, "access_denied"),
    (116, "certificate_required"),
];

/// The RFC 8446 name of a certificate alert ([`TransportError::certificate_alert`]).
///
/// ```
/// assert_eq!(repl_wire::transport::certificate_alert_name(44), "certificate_revoked");
/// ```
pub fn certificate_alert_name(alert: u8) -> &'static str {
    CERTIFICATE_ALERTS.iter().find(|(a, _)| *a == alert).map_or("(not a certificate alert)", |(_, n)| n)
}

/// The appliances allowed to connect (the topology), shared with the verifiers so a
/// topology change takes effect on the next handshake.
#[derive(Debug, Clone, Default)]
pub struct AllowedPeers(Arc<RwLock<BTreeSet<NodeId>>>);

impl AllowedPeers {
    /// An allowed set holding `ids`.
    pub fn new(ids: impl IntoIterator<Item = NodeId>) -> Self {
        AllowedPeers(Arc::new(RwLock::new(ids.into_iter().collect())))
    }

    /// Replaces the set.
    pub fn replace(&self, ids: impl IntoIterator<Item = NodeId>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ids.into_iter().collect();
    }

    /// Whether `id` may connect.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).contains(id)
    }
}

/// Records the TLS secrets' labels and lengths (never the secrets themselves), so a
/// test can see which suite was negotiated: SHA-384 suites have 48-byte secrets.
#[derive(Debug, Default)]
pub struct KeyLogRecorder(Mutex<Vec<(String, usize)>>);

impl KeyLogRecorder {
    /// (label, secret length) for every secret logged so far.
    pub fn entries(&self) -> Vec<(String, usize)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::KeyLog for KeyLogRecorder {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((label.to_string(), secret.len()));
    }

    fn will_log(&self, _label: &str) -> bool {
        true
    }
}

/// Everything one endpoint needs for mutual TLS: the enterprise CA, the CRLs, its own
/// certificate and key, and the allowed appliances.
#[derive(Debug)]
pub struct TlsSetup {
    ca: CertificateDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    allowed: AllowedPeers,
    key_log: Option<Arc<KeyLogRecorder>>,
    traffic_suites: Vec<SupportedCipherSuite>,
}

impl Clone for TlsSetup {
    fn clone(&self) -> Self {
        TlsSetup {
            ca: self.ca.clone(),
            crls: self.crls.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            allowed: self.allowed.clone(),
            key_log: self.key_log.clone(),
            traffic_suites: self.traffic_suites.clone(),
        }
    }
}

impl TlsSetup {
    /// Builds a setup from PEM text: CA certificate, own certificate and key, CRLs.
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        crl_pems: &[String],
        allowed: AllowedPeers,
    ) -> Result<TlsSetup, TransportError> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|_| TransportError::Pem { what: "CA certificate" })?;
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| TransportError::Pem { what: "certificate" })?];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| TransportError::Pem { what: "private key" })?;
        let crls = crl_pems
            .iter()
            .map(|p| {
                CertificateRevocationListDer::from_pem_slice(p.as_bytes())
                    .map_err(|_| TransportError::Pem { what: "CRL" })
            })
            .collect::<Result<_, _>>()?;
        Ok(TlsSetup {
            ca,
            crls,
            chain,
            key,
            allowed,
            key_log: None,
            traffic_suites: vec![aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384],
        })
    }

    /// Records secret labels and lengths into `log` (tests assert the negotiated suite).
    pub fn with_key_log(mut self, log: Arc<KeyLogRecorder>) -> Self {
        self.key_log = Some(log);
        self
    }

    /// Replaces the CRLs (a new revocation reaches this endpoint's next handshakes).
    pub fn with_crls(mut self, crl_pems: &[String]) -> Result<Self, TransportError> {
        self.crls = crl_pems
            .iter()
            .map(|p| {
                CertificateRevocationListDer::from_pem_slice(p.as_bytes())
                    .map_err(|_| TransportError::Pem { what: "CRL" })
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Test-only: offer these traffic suites instead of AES-256-GCM, to show that a
    /// peer offering only AES-128 is refused.
    #[doc(hidden)]
    pub fn with_traffic_suites_for_tests(mut self, suites: Vec<SupportedCipherSuite>) -> Self {
        self.traffic_suites = suites;
        self
    }

    /// The allowed appliances this setup verifies against.
    pub fn allowed(&self) -> &AllowedPeers {
        &self.allowed
    }

    fn provider(&self) -> Arc<CryptoProvider> {
        let mut p = aws_lc_rs::default_provider();
        p.cipher_suites = self.traffic_suites.clone();
        Arc::new(p)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TransportError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// The QUIC server configuration: client certificates mandatory, ALPN `alpns`.
    pub fn server_config(&self, alpns: &[&[u8]]) -> Result<quinn::ServerConfig, TransportError> {
        let provider = self.provider();
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(IdentityClientVerifier { inner, allowed: self.allowed.clone() });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        tls.max_early_data_size = 0; // no 0-RTT: replayable data has no place here
        if let Some(log) = &self.key_log {
            tls.key_log = log.clone();
        }
        let quic = QuicServerConfig::with_initial(Arc::new(tls), initial_suite()?)
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport_config()?);
        Ok(config)
    }

    /// The QUIC client configuration for protocol `alpn`.
    pub fn client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, TransportError> {
        let provider = self.provider();
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(ApplianceServerVerifier { inner });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.enable_early_data = false;
        if let Some(log) = &self.key_log {
            tls.key_log = log.clone();
        }
        let quic = QuicClientConfig::with_initial(Arc::new(tls), initial_suite()?)
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport_config()?);
        Ok(config)
    }

    /// Test-only: a client configuration that presents no certificate.
    #[doc(hidden)]
    pub fn client_config_without_certificate_for_tests(
        &self,
        alpn: &[u8],
    ) -> Result<quinn::ClientConfig, TransportError> {
        let provider = self.provider();
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ApplianceServerVerifier { inner }))
            .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let quic = QuicClientConfig::with_initial(Arc::new(tls), initial_suite()?)
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }
}

/// The suite that protects QUIC Initial packets (RFC 9001 requires AES-128-GCM there);
/// it is never negotiated for traffic.
fn initial_suite() -> Result<rustls::quic::Suite, TransportError> {
    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|s| s.quic_suite())
        .ok_or(TransportError::Tls(rustls::Error::General("no QUIC initial suite".into())))
}

/// Bytes a peer may send on one stream beyond what the application has read. quinn's
/// default (1.25 MB, sized for 100 Mbit/s at 100 ms) holds two messages of 256 entries
/// of 2 KiB, so a sender waited on each credit update of a receiver busy applying the
/// one before. Memory stays bounded by the sync window (entries in flight), not by
/// this.
const STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Bytes sent and not yet acknowledged, over all streams of a connection (quinn's
/// default is 10 MB).
const SEND_WINDOW: u64 = 32 * 1024 * 1024;

fn transport_config() -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .map_err(|_| TransportError::Tls(rustls::Error::General("idle timeout".into())))?,
    ));
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.send_window(SEND_WINDOW);
    Ok(Arc::new(t))
}

/// The identity a certificate names in its URI SAN, if exactly one of ours.
pub(crate) fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut found = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
        _ => None,
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

fn serial_u64(raw: &[u8]) -> Option<u64> {
    let digits: Vec<u8> = raw.iter().copied().skip_while(|b| *b == 0).collect();
    (digits.len() <= 8).then(|| digits.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
}

/// The serial numbers a CRL (PEM) revokes; serials longer than 64 bits (never issued
/// by this enterprise's CA) are left out.
pub fn crl_serials(pem: &str) -> Result<Vec<u64>, TransportError> {
    let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| TransportError::Pem { what: "CRL" })?;
    let (_, crl) =
        x509_parser::parse_x509_crl(der.as_ref()).map_err(|_| TransportError::Pem { what: "CRL" })?;
    Ok(crl.iter_revoked_certificates().filter_map(|r| serial_u64(r.raw_serial())).collect())
}

/// The serial number of a certificate (PEM).
pub fn certificate_serial(pem: &str) -> Result<u64, TransportError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| TransportError::Pem { what: "certificate" })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|_| TransportError::Pem { what: "certificate" })?;
    serial_u64(parsed.tbs_certificate.raw_serial()).ok_or(TransportError::Pem { what: "certificate serial" })
}

/// The serial number of the certificate the other end of `conn` presented.
pub fn peer_serial(conn: &quinn::Connection) -> Option<u64> {
    let chain = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    serial_u64(parsed.tbs_certificate.raw_serial())
}

fn refuse() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Server side: the chain, expiry and CRLs by webpki; then the identity: an appliance
/// must be in the allowed set, clients and admins need only a valid certificate.
#[derive(Debug)]
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: AllowedPeers,
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match identity_of(end_entity) {
            Some(Identity::Appliance(id)) if !self.allowed.contains(&id) => Err(refuse()),
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(refuse()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the chain, expiry, CRLs and DNS name by webpki; then the certificate
/// must name the same appliance in its URI SAN.
#[derive(Debug)]
struct ApplianceServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ApplianceServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match (identity_of(end_entity), server_name) {
            (Some(Identity::Appliance(id)), ServerName::DnsName(dns)) if id.as_str() == dns.as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(refuse()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server endpoint on `addr` speaking `alpns`.
pub fn server_endpoint(
    addr: SocketAddr,
    setup: &TlsSetup,
    alpns: &[&[u8]],
) -> Result<quinn::Endpoint, TransportError> {
    Ok(quinn::Endpoint::server(setup.server_config(alpns)?, addr)?)
}

/// A client-only endpoint bound to `bind` (port 0 for an ephemeral one).
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    Ok(quinn::Endpoint::client(bind)?)
}

/// Connects to appliance `appliance` at `addr` over protocol `alpn`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    setup: &TlsSetup,
    alpn: &[u8],
    addr: SocketAddr,
    appliance: &NodeId,
) -> Result<quinn::Connection, TransportError> {
    let connecting = endpoint.connect_with(setup.client_config(alpn)?, addr, appliance.as_str())?;
    Ok(connecting.await?)
}

/// The ALPN protocol a connection negotiated (empty if none).
pub fn negotiated_alpn(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default()
}

/// Completes an incoming connection's handshake (client certificate verified by the
/// server's verifier) and authorizes its identity for the negotiated protocol:
/// appliances on `repl-peer/1`; clients, admins and (G4 service) appliances on
/// `repl-client/1`. A refused
/// connection is closed before any stream is accepted.
pub async fn accept(incoming: quinn::Incoming) -> Result<(quinn::Connection, Identity), TransportError> {
    let conn = incoming.await?;
    let alpn = negotiated_alpn(&conn);
    let identity = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(identity_of));
    let allowed = match (&identity, alpn.as_slice()) {
        (Some(Identity::Appliance(_)), a) if a == ALPN_PEER => true,
        // A G4 service appliance reaches a database appliance as a client.
        (Some(Identity::Client(_) | Identity::Admin(_) | Identity::Appliance(_)), a) if a == ALPN_CLIENT => {
            true
        }
        _ => false,
    };
    if !allowed {
        conn.close(quinn::VarInt::from_u32(1), b"identity not allowed on this protocol");
        return Err(TransportError::NotAuthorized {
            identity,
            alpn: String::from_utf8_lossy(&alpn).into_owned(),
        });
    }
    let identity = identity.ok_or(TransportError::NotAuthorized { identity: None, alpn: String::new() })?;
    Ok((conn, identity))
}
