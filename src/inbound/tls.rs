//! The inbound TLS certificate (STARTTLS on 25 and 587, implicit TLS on 465): from
//! `[tls] cert`/`key`, or a self-signed one generated once in `DATA_DIR/tls/` so
//! opportunistic TLS works out of the box (senders do not verify MX certificates by
//! default; encryption still beats none). Mail clients do verify: submission wants a
//! real certificate in `[tls]`.

use crate::config::Config;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

fn load(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read TLS certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read TLS key {}: {e}", key.display()))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not fit: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Writes a self-signed certificate for the hostname unless one is there already.
fn ensure_self_signed(dir: &Path, hostname: &str) -> Result<(), String> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    crate::disk::create_dir_durable(dir, crate::disk::PRIVATE)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![hostname.to_string()]).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let c = params.self_signed(&kp).map_err(|e| e.to_string())?;
    let write = |p: &Path, data: &str| -> Result<(), String> {
        use std::io::Write;
        crate::disk::create_file(p, crate::disk::PRIVATE, true)
            .and_then(|mut f| f.write_all(data.as_bytes()).and_then(|_| f.sync_all()))
            .map_err(|e| format!("writing {}: {e}", p.display()))
    };
    write(&key, &kp.serialize_pem())?;
    write(&cert, &c.pem())?;
    crate::disk::sync_dir(dir).map_err(|e| format!("fsync {}: {e}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "generated a self-signed certificate for STARTTLS");
    Ok(())
}

pub fn acceptor(cfg: &Config) -> Result<Option<TlsAcceptor>, String> {
    if !cfg.tls.starttls {
        return Ok(None);
    }
    certificate(cfg).map(Some)
}

/// The submission ports' TLS (STARTTLS on 587, implicit on 465): the same
/// certificate, whatever `[tls] starttls` says for port 25 — submission without TLS
/// does not exist.
pub fn submission_acceptor(cfg: &Config) -> Result<TlsAcceptor, String> {
    certificate(cfg)
}

fn certificate(cfg: &Config) -> Result<TlsAcceptor, String> {
    let (cert, key) = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = cfg.data_dir.join("tls");
            ensure_self_signed(&dir, &cfg.hostname)?;
            (dir.join("cert.pem"), dir.join("key.pem"))
        }
    };
    load(&cert, &key)
}
