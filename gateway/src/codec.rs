//! The gRPC codec of every etcd service: prost, with small starting
//! buffers.
//!
//! tonic's default codec gives every call an 8 KiB encode buffer and an
//! 8 KiB decode buffer up front. For a unary call they live as long as
//! the call; for a Watch stream, as long as the stream — 16 KiB per
//! stream that an idle watch client never uses (etcd's whole per-stream
//! cost is about 18 KiB). Most etcd messages are far smaller, and both
//! buffers grow on demand (a large Range response or event batch grows
//! them as it is encoded), so starting at [`START_BUFFER_BYTES`] costs a
//! growth step only for the messages that needed it anyway.
//!
//! That step is one step: the encoder reserves a message's whole encoded
//! length before it writes it ([`EtcdEncoder`]). prost's own encoder writes
//! into the buffer as it goes, and a 30 KiB list page grew a 1 KiB buffer
//! five times, copying it each time.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstDecoder;

/// Starting size of each encode and decode buffer.
pub const START_BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a stream's buffer is handed to the transport
/// (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with [`START_BUFFER_BYTES`] buffers (see the module
/// docs); `build.rs` makes the generated services use it.
pub struct EtcdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for EtcdCodec<T, U> {
    fn default() -> Self {
        EtcdCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(START_BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for EtcdCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = EtcdEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        EtcdEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

/// prost encoding into room reserved for the whole message (see the
/// module docs).
pub struct EtcdEncoder<T>(PhantomData<T>);

impl<T: prost::Message> Encoder for EtcdEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
