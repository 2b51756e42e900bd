//! The wire: framing of backend messages, shared by the command phase
//! (`connection.rs`) and the CopyBoth phase (`stream.rs`).

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ReplicationError, ServerError};

/// Any byte stream to the server (TCP or a Unix socket).
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// A backend message, including CopyBothResponse, which postgres-protocol
/// does not parse.
pub(crate) enum BackendMessage {
    CopyBothResponse,
    Other(backend::Message),
}

/// Framing shared by the command phase and the CopyBoth phase.
pub(crate) struct Wire {
    socket: Box<dyn Socket>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// The server's address, for every error this connection reports.
    address: String,
}

impl Wire {
    pub(crate) fn new(socket: Box<dyn Socket>, address: String) -> Self {
        Wire {
            socket,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            address,
        }
    }

    /// The server's address.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// An ErrorResponse of this connection's server.
    pub(crate) fn server_error(&self, fields: backend::ErrorFields<'_>) -> ReplicationError {
        match parse_server_error(fields) {
            Ok(error) => ReplicationError::Server {
                address: self.address.clone(),
                error: Box::new(error),
            },
            Err(e) => e,
        }
    }

    fn lost(&self, error: std::io::Error) -> ReplicationError {
        ReplicationError::Lost {
            address: self.address.clone(),
            error,
        }
    }
}

impl Wire {
    /// Reads the next complete message. Cancel-safe: a partial message stays
    /// in the buffer for the next call.
    pub(crate) async fn read_message(&mut self) -> Result<BackendMessage, ReplicationError> {
        loop {
            if let Some(header) = backend::Header::parse(&self.read_buf)? {
                if header.tag() == b'W' {
                    let total = header.len() as usize + 1;
                    if self.read_buf.len() >= total {
                        self.read_buf.advance(total);
                        return Ok(BackendMessage::CopyBothResponse);
                    }
                } else if let Some(message) = backend::Message::parse(&mut self.read_buf)? {
                    return Ok(BackendMessage::Other(message));
                }
            }
            self.read_buf.reserve(64 * 1024);
            let read = self
                .socket
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| self.lost(e))?;
            if read == 0 {
                return Err(ReplicationError::Closed {
                    address: self.address.clone(),
                });
            }
        }
    }

    /// The buffer to encode frontend messages into before `flush`.
    pub(crate) fn out(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        let data = self.write_buf.split();
        if let Err(e) = self.socket.write_all(&data).await {
            return Err(self.lost(e));
        }
        self.socket.flush().await.map_err(|e| self.lost(e))
    }
}

fn parse_server_error(
    mut fields: backend::ErrorFields<'_>,
) -> Result<ServerError, ReplicationError> {
    let mut error = ServerError {
        severity: "ERROR".into(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    while let Some(field) = fields.next()? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    Ok(error)
}

/// A CopyData payload ready to send.
pub(crate) fn copy_data(payload: Bytes, out: &mut BytesMut) -> Result<(), ReplicationError> {
    frontend::CopyData::new(payload)?.write(out);
    Ok(())
}
