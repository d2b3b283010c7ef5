//! The connection under a producer or consumer, plain or TLS: frames are queued into a
//! write buffer and flushed in one write; while flushing it also reads, so a client that
//! has much to send can never deadlock against a broker that waits for it to read its
//! replies.

use std::collections::VecDeque;
use std::fmt::Display;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_util::codec::Decoder;

use super::error::ClientError;
use crate::protocol::client_frame::ClientFrame;
use crate::protocol::codec::FrameDecoder;
use crate::protocol::server_frame::ReceivedFrame;
use crate::transport::{ClientTls, Stream, host_of, poll_io};

/// Frames from the broker may exceed the broker's limit for client frames (a delivery of
/// a maximum-size payload carries its envelope too); the client accepts anything a u32
/// length can describe.
const SERVER_FRAME_BYTES_MAX: usize = u32::MAX as usize;
const READ_CHUNK_BYTES: usize = 64 * 1024;

pub(crate) struct ClientConnection {
    stream: Stream,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    write_buf: BytesMut,
    inbox: VecDeque<ReceivedFrame>,
}

impl ClientConnection {
    /// Connects (over TLS when `tls` is given) and registers; returns once the broker said
    /// `ok`.
    pub async fn open<A: ToSocketAddrs + Display>(
        addr: A,
        tls: Option<&ClientTls>,
        register: &ClientFrame<'_>,
    ) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let tcp = TcpStream::connect(&addr).await.map_err(connect_error)?;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let addr_text = addr.to_string();
                tls.connect(host_of(&addr_text), tcp)
                    .await
                    .map_err(connect_error)?
            }
        };
        let mut connection = ClientConnection {
            stream,
            decoder: FrameDecoder::new(SERVER_FRAME_BYTES_MAX),
            read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            write_buf: BytesMut::new(),
            inbox: VecDeque::new(),
        };
        connection.queue(register);
        match connection.next_frame().await? {
            ReceivedFrame::Ok { id: None } => Ok(connection),
            ReceivedFrame::Error(refusal) => Err(ClientError::Refused(refusal)),
            other => Err(ClientError::Protocol(format!(
                "expected the register's ok, got {other:?}"
            ))),
        }
    }

    /// Queues a frame; nothing is sent until [`Self::flush`] or [`Self::next_frame`].
    pub fn queue(&mut self, frame: &ClientFrame<'_>) {
        frame.encode(&mut self.write_buf);
    }

    pub fn queued_bytes(&self) -> usize {
        self.write_buf.len()
    }

    /// Sends everything queued, reading whatever the broker sends meanwhile.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        while !self.write_buf.is_empty() {
            self.read_buf.reserve(READ_CHUNK_BYTES);
            let progress = std::future::poll_fn(|cx| {
                poll_io(
                    cx,
                    &mut self.stream,
                    &mut self.read_buf,
                    &mut self.write_buf,
                    READ_CHUNK_BYTES,
                )
            })
            .await?;
            match progress.read {
                Some(0) => return Err(ClientError::Closed),
                Some(_) => decode_frames(&mut self.decoder, &mut self.read_buf, &mut self.inbox)?,
                None => {}
            }
        }
        Ok(())
    }

    /// The next frame from the broker. Queued frames are flushed only when it must wait
    /// for the socket, so a burst of received frames costs no write per frame.
    pub async fn next_frame(&mut self) -> Result<ReceivedFrame, ClientError> {
        if let Some(frame) = self.inbox.pop_front() {
            return Ok(frame);
        }
        self.flush().await?;
        loop {
            if let Some(frame) = self.inbox.pop_front() {
                return Ok(frame);
            }
            self.read_buf.reserve(READ_CHUNK_BYTES);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ClientError::Closed);
            }
            decode_frames(&mut self.decoder, &mut self.read_buf, &mut self.inbox)?;
        }
    }

    /// A frame already received, if any; never touches the socket.
    pub fn next_received(&mut self) -> Option<ReceivedFrame> {
        self.inbox.pop_front()
    }

    /// Flushes and closes the write side, so the broker sees a clean end.
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

fn decode_frames(
    decoder: &mut FrameDecoder,
    read_buf: &mut BytesMut,
    inbox: &mut VecDeque<ReceivedFrame>,
) -> Result<(), ClientError> {
    while let Some(body) = decoder
        .decode(read_buf)
        .map_err(|e| ClientError::Protocol(e.to_string()))?
    {
        let frame = ReceivedFrame::decode(&body).map_err(|e| {
            ClientError::Protocol(format!("{e} in {:?}", String::from_utf8_lossy(&body)))
        })?;
        inbox.push_back(frame);
    }
    Ok(())
}
