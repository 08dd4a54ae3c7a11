//! QUIC endpoints with mutual TLS 1.3 (feature `transport`).
//!
//! Every connection is TLS 1.3 with `TLS_AES_256_GCM_SHA384` for all traffic; the
//! AES-128 suite exists only to protect QUIC Initial packets (`with_initial`), which
//! carry nothing secret. No 0-RTT. Both sides present certificates signed by the
//! enterprise CA; the server checks the client's identity (a URI SAN) against the
//! allowed set in its verifier, and [`accept`] refuses a connection whose identity
//! does not fit its ALPN before any application data is read.

mod certs;
mod framed;
mod tls;

pub use certs::{read_pem, CertError, CertificateAuthority, Identity, IssuedCertificate, KeyFile, Validity};
pub use framed::{recv_message, send_message};
pub use tls::{
    accept, certificate_alert_name, certificate_serial, client_endpoint, connect, crl_serials,
    negotiated_alpn, peer_serial, server_endpoint, AllowedPeers, KeyLogRecorder, TlsSetup, TransportError,
    IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL,
};
