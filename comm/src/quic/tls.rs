//! TLS for the QUIC endpoint: a fresh self-signed certificate per endpoint and a client that
//! accepts any certificate but checks the handshake signatures.
//!
//! Certificates prove nothing here (no CA knows a job's processes); identity comes from the job
//! secret, bound to the TLS session by [`super::auth`]. The handshake signature check still binds
//! the session keys to the certificate's private key, so the exported keying material is unique to
//! this one session and a relay in the middle cannot forward an authentication tag.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::{Error, Result};

/// The ALPN protocol name both sides insist on.
pub(crate) const ALPN: &[u8] = b"meshflow/1";

/// ring's provider with AES-128-GCM preferred: the cheapest suite per byte on CPUs with AES
/// instructions (10 rounds against AES-256's 14), which bulk tensor traffic pays on every byte.
/// The other TLS 1.3 suites stay available.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = crypto::ring::default_provider();
    provider.cipher_suites = vec![
        crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn setup_error(what: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Setup { reason: format!("{what}: {reason}") }
}

/// Server side: a new self-signed certificate for this endpoint.
pub(crate) fn server_config() -> Result<QuicServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec!["meshflow".to_string()])
        .map_err(|error| setup_error("certificate generation")(error.to_string()))?;
    let certificate = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| setup_error("TLS server")(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![certificate], PrivateKeyDer::Pkcs8(key))
        .map_err(|error| setup_error("TLS server certificate")(error.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|error| setup_error("QUIC server")(error.to_string()))
}

/// Client side: accepts the peer's self-signed certificate, checks handshake signatures.
pub(crate) fn client_config() -> Result<QuicClientConfig> {
    let provider = provider();
    let verifier = Arc::new(SignatureOnlyVerifier { provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| setup_error("TLS client")(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|error| setup_error("QUIC client")(error.to_string()))
}

/// Trusts any certificate (identity is proven by the job secret afterwards) but verifies that the
/// server signed the handshake with the certificate's key.
#[derive(Debug)]
struct SignatureOnlyVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SignatureOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        crypto::verify_tls12_signature(message, certificate, signature, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        crypto::verify_tls13_signature(message, certificate, signature, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
