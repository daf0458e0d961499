//! Byte encodings shared by the log, the state machine store and snapshots.
//!
//! Everything Keel writes is encoded with `postcard` (compact, deterministic) inside a frame that
//! names its length, so that a short read is always `UnexpectedEof` (a torn write) and never confused
//! with corruption (`InvalidData`). Checksums live one level up, in the record or frame that holds
//! these bytes.

use std::io;
use std::io::Read;
use std::io::Write;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest single encoded value we accept back from disk or the network: a guard so that a
/// corrupt length prefix cannot make us allocate gigabytes.
pub const MAX_VALUE_BYTES: usize = 256 * 1024 * 1024;

pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes `value` as `len: u32 LE | postcard bytes`, returning the bytes written.
pub fn write_framed<T: Serialize + ?Sized, W: Write>(value: &T, mut w: W) -> io::Result<usize> {
    let bytes = to_bytes(value)?;
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "value larger than 4 GiB"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&bytes)?;
    Ok(4 + bytes.len())
}

/// Reads a value written by [`write_framed`]. A short input is `UnexpectedEof`; anything that does
/// not decode is `InvalidData`.
pub fn read_framed<T: DeserializeOwned, R: Read>(mut r: R) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_VALUE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("encoded length {len} exceeds the {MAX_VALUE_BYTES} byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    from_bytes(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_round_trip_and_torn_input() -> io::Result<()> {
        let mut buf = Vec::new();
        write_framed(&("key", 42u64), &mut buf)?;
        let back: (String, u64) = read_framed(&buf[..])?;
        assert_eq!(("key".to_string(), 42), back);

        for cut in 0..buf.len() {
            let err = read_framed::<(String, u64), _>(&buf[..cut]).expect_err("short input must fail");
            assert_eq!(io::ErrorKind::UnexpectedEof, err.kind(), "cut at {cut}");
        }
        Ok(())
    }

    #[test]
    fn oversized_length_is_invalid_data() {
        let buf = u32::MAX.to_le_bytes();
        let err = read_framed::<u64, _>(&buf[..]).expect_err("must fail");
        assert_eq!(io::ErrorKind::InvalidData, err.kind());
    }
}
