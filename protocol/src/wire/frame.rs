//! Framing: `u32` big-endian body length + msgpack body `[version, message]`.

use std::io::{self, Read, Write};

use rmp::Marker;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{MAX_FRAME_LEN, PROTOCOL_VERSION};

/// The deepest nesting of msgpack arrays/maps the decoder follows. ergon's messages nest
/// four levels at most; a low limit keeps hostile input from recursing deep into the stack
/// (rmp-serde's own default is 1024).
const MAX_DEPTH: usize = 32;

/// Why a frame could not be written, read or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The socket failed, including a read or write timeout (see [`FrameError::is_timeout`]).
    #[error("ergon socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly, before the first byte of a frame. For a
    /// server this is the normal end of a connection, not an error to log.
    #[error("ergon peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("ergon frame truncated: expected {expected} bytes, got {got} before the peer closed the connection")]
    ShortRead {
        /// Bytes the length prefix (4) or the body (its announced length) needed.
        expected: usize,
        /// Bytes actually received.
        got: usize,
    },
    /// A frame body longer than the limit, announced by a peer or produced by us.
    #[error("ergon frame of {len} bytes exceeds the {max}-byte limit; the peer is not speaking ergon's protocol, or the message is too large")]
    Oversize {
        /// The body length announced or produced.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The frame carries a protocol version this build does not speak.
    #[error("ergon protocol version {got} is not supported (this build speaks version {supported}); install the same ergon version on the plugin and ergond")]
    UnknownVersion {
        /// The version in the frame.
        got: u16,
        /// [`PROTOCOL_VERSION`].
        supported: u16,
    },
    /// The body is not a valid message of the expected type.
    #[error("ergon frame could not be decoded: {0}")]
    Undecodable(String),
    /// The message could not be encoded (only for types serde cannot express in msgpack).
    #[error("ergon message could not be encoded: {0}")]
    Encode(String),
}

impl FrameError {
    /// Whether this is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expiring shows up as
    /// `WouldBlock` on Linux, `TimedOut` elsewhere and in tokio timeouts), so that a caller
    /// can say "ergond did not answer in time" rather than report a broken socket.
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Encode `msg` as a complete frame: length prefix and body carrying [`PROTOCOL_VERSION`].
///
/// Fails with [`FrameError::Oversize`] if the body would exceed [`MAX_FRAME_LEN`], so that
/// a sender learns of the problem instead of the receiver dropping the connection.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; 4];
    rmp_serde::encode::write_named(&mut frame, &(PROTOCOL_VERSION, msg))
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversize {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decode a frame body (without its length prefix).
///
/// The version is read and checked first, so a frame from another protocol version fails
/// with [`FrameError::UnknownVersion`] whatever its message looks like. The body must hold
/// exactly `[version, message]`; trailing bytes are rejected as a sign of a framing bug.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let mut rest = body;
    let n = rmp::decode::read_array_len(&mut rest).map_err(|e| {
        FrameError::Undecodable(format!("body is not a [version, message] array: {e}"))
    })?;
    if n != 2 {
        return Err(FrameError::Undecodable(format!(
            "body is an array of {n} elements, expected [version, message]"
        )));
    }
    let got = rmp::decode::read_int::<u64, _>(&mut rest).map_err(|e| {
        FrameError::Undecodable(format!(
            "protocol version is not a non-negative integer: {e}"
        ))
    })?;
    if got != u64::from(PROTOCOL_VERSION) {
        return Err(FrameError::UnknownVersion {
            got: u16::try_from(got).unwrap_or(u16::MAX),
            supported: PROTOCOL_VERSION,
        });
    }
    let len = value_len(rest).map_err(FrameError::Undecodable)?;
    if len != rest.len() {
        return Err(FrameError::Undecodable(format!(
            "{} unexpected bytes after the message",
            rest.len() - len
        )));
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(rest);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| FrameError::Undecodable(e.to_string()))
}

/// The encoded length of the msgpack value at the start of `buf`.
///
/// Walks the value iteratively (no recursion, no allocation), so it bounds the work done on
/// hostile input by the input's length: each step consumes at least one byte.
fn value_len(buf: &[u8]) -> Result<usize, String> {
    let truncated = || "message truncated inside the frame".to_owned();
    let mut pos = 0usize;
    // Values still to skip; u64 because a map32 claims up to 2 * (2^32 - 1) of them.
    let mut pending: u64 = 1;
    let read_len = |pos: &mut usize, width: usize| -> Result<u64, String> {
        let bytes = buf.get(*pos..*pos + width).ok_or_else(truncated)?;
        *pos += width;
        Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    while pending > 0 {
        pending -= 1;
        let byte = *buf.get(pos).ok_or_else(truncated)?;
        pos += 1;
        let skip: u64 = match Marker::from_u8(byte) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::Reserved => return Err(format!("reserved msgpack marker 0x{byte:02x}")),
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixStr(n) => u64::from(n),
            Marker::Str8 | Marker::Bin8 => read_len(&mut pos, 1)?,
            Marker::Str16 | Marker::Bin16 => read_len(&mut pos, 2)?,
            Marker::Str32 | Marker::Bin32 => read_len(&mut pos, 4)?,
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::Ext8 => read_len(&mut pos, 1)? + 1,
            Marker::Ext16 => read_len(&mut pos, 2)? + 1,
            Marker::Ext32 => read_len(&mut pos, 4)? + 1,
            Marker::FixArray(n) => {
                pending += u64::from(n);
                0
            }
            Marker::Array16 => {
                pending += read_len(&mut pos, 2)?;
                0
            }
            Marker::Array32 => {
                pending += read_len(&mut pos, 4)?;
                0
            }
            Marker::FixMap(n) => {
                pending += 2 * u64::from(n);
                0
            }
            Marker::Map16 => {
                pending += 2 * read_len(&mut pos, 2)?;
                0
            }
            Marker::Map32 => {
                pending += 2 * read_len(&mut pos, 4)?;
                0
            }
        };
        let remaining = (buf.len() - pos) as u64;
        if skip > remaining {
            return Err(truncated());
        }
        pos += skip as usize;
    }
    Ok(pos)
}

/// Write `msg` as one frame and flush.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Read one frame and decode its message, with the limit [`MAX_FRAME_LEN`].
///
/// Blocks until a whole frame has arrived; set a read timeout on the socket to bound the
/// wait (a timeout gives [`FrameError::Io`], see [`FrameError::is_timeout`]).
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    read_frame_with_limit(r, MAX_FRAME_LEN)
}

/// [`read_frame`] with a body limit of `limit` bytes instead of [`MAX_FRAME_LEN`].
///
/// The announced length is checked against `limit` before the body buffer is allocated or
/// any body byte read, so a peer claiming a 4 GiB frame costs nothing.
pub fn read_frame_with_limit<R: Read, T: DeserializeOwned>(
    r: &mut R,
    limit: usize,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    match read_full(r, &mut prefix)? {
        0 => return Err(FrameError::Closed),
        4 => {}
        got => return Err(FrameError::ShortRead { expected: 4, got }),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(FrameError::Oversize { len, max: limit });
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got != len {
        return Err(FrameError::ShortRead { expected: len, got });
    }
    decode_body(&body)
}

/// Fill `buf` as far as the reader allows; returns how many bytes were read, fewer than
/// `buf.len()` only at end of stream. Counting ourselves (rather than `read_exact`) is what
/// lets [`FrameError::ShortRead`] say how much arrived.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(feature = "tokio")]
mod async_io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Async [`write_frame`]: write `msg` as one frame and flush.
    pub async fn write_frame_async<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
    where
        W: AsyncWrite + Unpin,
        T: Serialize,
    {
        let frame = encode_frame(msg)?;
        w.write_all(&frame).await?;
        w.flush().await?;
        Ok(())
    }

    /// Async [`read_frame`], with the same checks and errors. Wrap it in
    /// `tokio::time::timeout` to bound the wait.
    pub async fn read_frame_async<R, T>(r: &mut R) -> Result<T, FrameError>
    where
        R: AsyncRead + Unpin,
        T: DeserializeOwned,
    {
        read_frame_async_with_limit(r, MAX_FRAME_LEN).await
    }

    /// Async [`read_frame_with_limit`].
    pub async fn read_frame_async_with_limit<R, T>(r: &mut R, limit: usize) -> Result<T, FrameError>
    where
        R: AsyncRead + Unpin,
        T: DeserializeOwned,
    {
        let mut prefix = [0u8; 4];
        match read_full_async(r, &mut prefix).await? {
            0 => return Err(FrameError::Closed),
            4 => {}
            got => return Err(FrameError::ShortRead { expected: 4, got }),
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > limit {
            return Err(FrameError::Oversize { len, max: limit });
        }
        let mut body = vec![0u8; len];
        let got = read_full_async(r, &mut body).await?;
        if got != len {
            return Err(FrameError::ShortRead { expected: len, got });
        }
        decode_body(&body)
    }

    async fn read_full_async<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match r.read(&mut buf[got..]).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

#[cfg(feature = "tokio")]
pub use async_io::{read_frame_async, read_frame_async_with_limit, write_frame_async};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_len_walks_nested_values() {
        let body =
            rmp_serde::to_vec_named(&(vec![1u32, 300, 70000], "abc", Some(1.5f64), ())).unwrap();
        assert_eq!(value_len(&body), Ok(body.len()));
        let mut longer = body.clone();
        longer.push(0xc0);
        assert_eq!(value_len(&longer), Ok(body.len()));
        for cut in 0..body.len() {
            assert!(value_len(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn value_len_rejects_huge_claims_quickly() {
        // map32 claiming 2^32 - 1 entries, then nothing.
        assert!(value_len(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
        // str32 claiming 4 GiB.
        assert!(value_len(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a']).is_err());
        assert!(value_len(&[0xc1]).is_err());
    }

    #[test]
    fn timeout_kinds_are_timeouts() {
        assert!(FrameError::Io(io::ErrorKind::WouldBlock.into()).is_timeout());
        assert!(FrameError::Io(io::ErrorKind::TimedOut.into()).is_timeout());
        assert!(!FrameError::Io(io::ErrorKind::BrokenPipe.into()).is_timeout());
        assert!(!FrameError::Closed.is_timeout());
    }
}
