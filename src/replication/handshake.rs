//! Opening a walsender connection: the socket (TCP with keepalives, or a
//! Unix socket), TLS when asked for, the startup message with
//! `replication=database`, and authentication (trust, cleartext, MD5,
//! SCRAM-SHA-256).

use std::collections::HashMap;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::error::ReplicationError;
use super::wire::{BackendMessage, Socket, Wire};
use crate::postgres::config::{ConnectionConfig, Host, SslMode};

/// Sends the startup message, authenticates, and reads the server's
/// parameters until it is ready for queries.
pub(super) async fn startup(
    wire: &mut Wire,
    config: &ConnectionConfig,
) -> Result<HashMap<String, String>, ReplicationError> {
    // Fixed output settings, so timestamps and text values decode the
    // same way whatever the server's defaults are.
    let params = [
        ("user", config.user.as_str()),
        ("database", config.dbname.as_str()),
        ("replication", "database"),
        ("application_name", config.application_name.as_str()),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "UTC"),
        ("bytea_output", "hex"),
    ];
    frontend::startup_message(params, wire.out())?;
    wire.flush().await?;
    authenticate(wire, config).await?;
    let mut parameters = HashMap::new();
    loop {
        match read(wire).await? {
            backend::Message::ParameterStatus(p) => {
                parameters.insert(p.name()?.to_owned(), p.value()?.to_owned());
            }
            backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
            backend::Message::ReadyForQuery(_) => return Ok(parameters),
            other => return Err(unexpected("startup", &other)),
        }
    }
}

async fn authenticate(wire: &mut Wire, config: &ConnectionConfig) -> Result<(), ReplicationError> {
    let password = || {
        config
            .password
            .as_ref()
            .map(|p| p.expose().as_bytes())
            .ok_or(ReplicationError::PasswordRequired)
    };
    match read(wire).await? {
        backend::Message::AuthenticationOk => return Ok(()),
        backend::Message::AuthenticationCleartextPassword => {
            frontend::password_message(password()?, wire.out())?;
        }
        backend::Message::AuthenticationMd5Password(body) => {
            let hash = md5_hash(config.user.as_bytes(), password()?, body.salt());
            frontend::password_message(hash.as_bytes(), wire.out())?;
        }
        backend::Message::AuthenticationSasl(body) => {
            let mut mechanisms = body.mechanisms();
            let mut has_scram = false;
            while let Some(m) = mechanisms.next()? {
                has_scram |= m == sasl::SCRAM_SHA_256;
            }
            if !has_scram {
                return Err(ReplicationError::UnsupportedAuthentication(
                    "SASL without SCRAM-SHA-256".into(),
                ));
            }
            scram(wire, password()?).await?;
        }
        backend::Message::AuthenticationGss | backend::Message::AuthenticationSspi => {
            return Err(ReplicationError::UnsupportedAuthentication(
                "GSSAPI/SSPI".into(),
            ));
        }
        backend::Message::AuthenticationKerberosV5 => {
            return Err(ReplicationError::UnsupportedAuthentication(
                "Kerberos V5".into(),
            ));
        }
        backend::Message::AuthenticationScmCredential => {
            return Err(ReplicationError::UnsupportedAuthentication(
                "SCM credential".into(),
            ));
        }
        other => return Err(unexpected("authentication", &other)),
    }
    if !matches!(
        flush_then_read(wire).await?,
        backend::Message::AuthenticationOk
    ) {
        return Err(ReplicationError::Protocol(
            "authentication did not end with AuthenticationOk".into(),
        ));
    }
    Ok(())
}

async fn scram(wire: &mut Wire, password: &[u8]) -> Result<(), ReplicationError> {
    let mut scram = sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), wire.out())?;
    match flush_then_read(wire).await? {
        backend::Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
        other => return Err(unexpected("SCRAM exchange", &other)),
    }
    frontend::sasl_response(scram.message(), wire.out())?;
    match flush_then_read(wire).await? {
        backend::Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
        other => return Err(unexpected("SCRAM exchange", &other)),
    }
    Ok(())
}

async fn flush_then_read(wire: &mut Wire) -> Result<backend::Message, ReplicationError> {
    wire.flush().await?;
    read(wire).await
}

/// Reads one message; an ErrorResponse becomes an error.
pub(super) async fn read(wire: &mut Wire) -> Result<backend::Message, ReplicationError> {
    match wire.read_message().await? {
        BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
            Err(wire.server_error(body.fields()))
        }
        BackendMessage::Other(message) => Ok(message),
        BackendMessage::CopyBothResponse => Err(ReplicationError::Protocol(
            "unexpected CopyBothResponse".into(),
        )),
    }
}

pub(super) async fn open_socket(
    config: &ConnectionConfig,
) -> Result<Box<dyn Socket>, ReplicationError> {
    let connect_error = |error| ReplicationError::Connect {
        address: config.address(),
        error,
    };
    Ok(match config.host() {
        Host::Tcp(host) => {
            let stream = TcpStream::connect((host.as_str(), config.port()))
                .await
                .map_err(connect_error)?;
            stream.set_nodelay(true).map_err(connect_error)?;
            config.keepalives.apply(&stream).map_err(connect_error)?;
            negotiate_tls(config, host, stream).await?
        }
        Host::UnixSocketDir(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", config.port()));
            Box::new(UnixStream::connect(path).await.map_err(connect_error)?)
        }
    })
}

/// Asks for TLS (SSLRequest) unless sslmode is disable, and wraps the
/// stream when the server agrees. Unix sockets never use TLS, as in libpq.
async fn negotiate_tls(
    config: &ConnectionConfig,
    host: &str,
    mut stream: TcpStream,
) -> Result<Box<dyn Socket>, ReplicationError> {
    let tls_error = |reason: String| ReplicationError::Tls {
        address: config.address(),
        reason,
    };
    let Some(tls) =
        crate::postgres::tls::client_config(config).map_err(|e| tls_error(e.to_string()))?
    else {
        return Ok(Box::new(stream));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = crate::postgres::tls::server_name(host).map_err(|e| tls_error(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, stream)
                .await
                .map_err(|e| tls_error(e.to_string()))?;
            Ok(Box::new(stream))
        }
        b'N' if config.ssl_mode == SslMode::Prefer => Ok(Box::new(stream)),
        b'N' => Err(tls_error(
            "the server does not accept TLS connections (ssl = off); turn ssl on in postgresql.conf, or use sslmode=prefer or disable".into(),
        )),
        other => Err(ReplicationError::Protocol(format!("unexpected answer {other:?} to SSLRequest"))),
    }
}

pub(super) fn unexpected(phase: &str, message: &backend::Message) -> ReplicationError {
    let name = match message {
        backend::Message::CopyData(_) => "CopyData",
        backend::Message::CopyDone => "CopyDone",
        backend::Message::DataRow(_) => "DataRow",
        backend::Message::CommandComplete(_) => "CommandComplete",
        backend::Message::ReadyForQuery(_) => "ReadyForQuery",
        backend::Message::RowDescription(_) => "RowDescription",
        _ => "another message",
    };
    ReplicationError::Protocol(format!("unexpected {name} during {phase}"))
}
