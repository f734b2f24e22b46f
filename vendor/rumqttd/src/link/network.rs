use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::{
    collections::VecDeque,
    io::{self, ErrorKind},
};
use tokio::time::Duration;

use crate::protocol::{self, Packet, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O = {0}")]
    Io(#[from] io::Error),
    #[error("Invalid data = {0}")]
    Protocol(#[from] protocol::Error),
    // PATCH(gateway): raised by the remote link's loop (`keepalive_limit`).
    #[error["Keep alive timeout"]]
    KeepAlive,
}

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network<P> {
    /// Socket for IO
    socket: Box<dyn N>,
    /// Buffered reads
    read: BytesMut,
    /// Buffered writes
    write: BytesMut,
    /// Maximum packet size
    max_incoming_size: usize,
    /// Maximum connection buffer count. TODO: Change this to use bytes for deterministicness
    max_connection_buffer_len: usize,
    /// Protocol
    protocol: P,
}

/// PATCH(gateway): how long a connection may stay silent: 1.5 x its keep alive, or no
/// limit for keep alive 0 ("no keep alive", MQTT 3.1.1 and 5.0 section 3.1.2.10). The
/// remote link's loop enforces it with one timer per connection, reset only when it
/// fires (patch 22): a timeout around each read registered and removed a timer in the
/// runtime's wheel for every packet read and every ack written.
pub fn keepalive_limit(keep_alive: u16) -> Option<Duration> {
    (keep_alive > 0).then(|| {
        let keep_alive = Duration::from_secs(keep_alive as u64);
        keep_alive + keep_alive.mul_f32(0.5)
    })
}

/// PATCH(gateway): the read buffer's first capacity, and what it is renewed with once
/// the publishes read into it are still referenced elsewhere (`BytesMut::reserve`).
const READ_BUFFER_START: usize = 2 * 1024;
/// PATCH(gateway): the write buffer's first capacity (it is cleared after each write and
/// keeps what it grew to).
const WRITE_BUFFER_START: usize = 512;

impl<P: Protocol> Network<P> {
    pub fn new(
        socket: Box<dyn N>,
        max_incoming_size: usize,
        max_connection_buffer_len: usize,
        protocol: P,
    ) -> Network<P> {
        Network {
            socket,
            // PATCH(gateway): small buffers that grow on demand (were 10 KiB each per
            // connection: 20 MB of heap for 1000 devices that send 100-byte readings).
            read: BytesMut::with_capacity(READ_BUFFER_START),
            write: BytesMut::with_capacity(WRITE_BUFFER_START),
            max_incoming_size,
            max_connection_buffer_len,
            protocol,
        }
    }

    /// PATCH(gateway): the Receive Maximum announced to MQTT 5 clients: the most
    /// packets one read hands over (`ConnectionSettings::max_inflight_count`), so a
    /// client within it has all its unacknowledged publishes handed over in one read.
    pub fn receive_maximum(&self) -> u16 {
        self.max_connection_buffer_len.clamp(1, u16::MAX as usize) as u16
    }

    /// Reads more than 'required' bytes to frame a packet into self.read buffer
    async fn read_bytes(&mut self, required: usize) -> io::Result<usize> {
        // TODO: Fix this cancellation bug and write unit test
        let mut total_read = 0;
        loop {
            let read = self.socket.read_buf(&mut self.read).await?;
            if 0 == read {
                let error = if self.read.is_empty() {
                    io::Error::new(ErrorKind::ConnectionAborted, "connection closed by peer")
                } else {
                    io::Error::new(ErrorKind::ConnectionReset, "connection reset by peer")
                };

                return Err(error);
            }

            total_read += read;
            if total_read >= required {
                return Ok(total_read);
            }
        }
    }

    /// Waits on network for 1 packet
    pub async fn read(&mut self) -> Result<Packet, Error> {
        loop {
            let required = match Protocol::read_mut(
                &mut self.protocol,
                &mut self.read,
                self.max_incoming_size,
            ) {
                Ok(packet) => return Ok(packet),
                Err(protocol::Error::InsufficientBytes(required)) => required,
                Err(e) => return Err(e.into()),
            };

            // read more packets until a frame can be created. This function
            // blocks until a frame can be created. Use this in a select! branch
            // PATCH(gateway): no timeout here; the remote link's loop enforces the keep
            // alive with one timer per connection (`keepalive_limit`).
            self.read_bytes(required).await?;
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub fn readv(&mut self, packets: &mut VecDeque<Packet>) -> Result<usize, Error> {
        loop {
            match self
                .protocol
                .read_mut(&mut self.read, self.max_incoming_size)
            {
                Ok(packet) => {
                    packets.push_back(packet);
                    let connection_buffer_length = packets.len();
                    if connection_buffer_length >= self.max_connection_buffer_len {
                        return Ok(connection_buffer_length);
                    }
                }
                Err(protocol::Error::InsufficientBytes(_)) => return Ok(packets.len()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e.to_string()).into()),
            }
        }
    }

    // PATCH(gateway): `write` and `writev` are `buffer` and `flush` (change 35).
    pub async fn write(&mut self, packet: Packet) -> Result<(), Error> {
        self.buffer([packet])?;
        self.flush().await
    }

    /// PATCH(gateway): encodes `packets` into the write buffer without writing it;
    /// [`Network::flush`] writes what was buffered. Returns how many were buffered.
    pub fn buffer(&mut self, packets: impl IntoIterator<Item = Packet>) -> Result<usize, Error> {
        let mut count = 0;
        for packet in packets {
            Protocol::write(&self.protocol, packet, &mut self.write)?;
            count += 1;
        }
        Ok(count)
    }

    /// PATCH(gateway): writes what [`Network::buffer`] encoded.
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }

    pub async fn writev(&mut self, packets: VecDeque<Packet>) -> Result<(), Error> {
        self.buffer(packets)?;
        self.flush().await
    }
}

pub trait N: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T> N for T where T: AsyncRead + AsyncWrite + Unpin + Send {}
