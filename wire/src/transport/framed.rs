//! Framed messages over QUIC streams (bidirectional or unidirectional).

use super::tls::TransportError;
use crate::codec::{decode_frame, encode_frame, FrameReader, WireMessage};

/// Sends one message as one frame.
pub async fn send_message<M: WireMessage>(
    send: &mut quinn::SendStream,
    message: &M,
) -> Result<(), TransportError> {
    let frame = encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Receives the next message; `None` when the stream finished cleanly between frames.
/// `reader` keeps bytes of the next frame between calls.
pub async fn recv_message<M: WireMessage>(
    recv: &mut quinn::RecvStream,
    reader: &mut FrameReader,
) -> Result<Option<M>, TransportError> {
    loop {
        if let Some(message) = reader.next_frame_with(decode_frame::<M>)? {
            return Ok(Some(message?));
        }
        match recv.read_chunk(crate::limits::FRAME_BYTES_MAX, true).await? {
            Some(chunk) => reader.push(&chunk.bytes),
            None if reader.buffered() == 0 => return Ok(None),
            None => return Err(TransportError::Truncated),
        }
    }
}
