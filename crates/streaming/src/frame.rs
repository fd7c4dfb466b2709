//! SPDY/3.1 framing (draft-mbelshe-httpbis-spdy-00 with the 3.1 flow-control frames):
//! frames to and from bytes, and the zlib-compressed name/value header blocks.
//!
//! The server ([`crate::spdy`]) and the integration tests' client both use this
//! codec: one implementation of the wire format, tested from both ends.
//!
//! Control frame: `1 | version:15 | type:16 | flags:8 | length:24 | payload`.
//! Data frame: `0 | stream id:31 | flags:8 | length:24 | data`.
//! A header block is `count:32 (name length:32 name value length:32 value)*`, values
//! with several entries joined by NUL, compressed by one zlib stream per direction
//! (primed with [`HEADER_DICTIONARY`]) and sync-flushed after every block.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use crate::error::StreamingError;

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;
/// The largest payload a frame's 24-bit length can say.
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// A decompressed header block larger than this is refused (a zip bomb guard).
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The headers a block turns into may take this much, measured as HTTP/2 measures a
/// header list (name + value + 32 per entry, RFC 9113 6.5.2): values split at NULs
/// repeat their name, so a small block could otherwise stand for a huge list.
const MAX_HEADER_LIST: usize = 2 << 20;
const HEADER_ENTRY_COST: usize = 32;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes used here.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;

/// Header names (lower case) with their values, in order.
pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// (flags, id, value) entries.
    Settings {
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A control frame of a type this codec does not know: skipped, as SPDY asks.
    Unknown {
        kind: u16,
    },
}

/// First value of a header, by (lower-case) name.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Writes the frames one end sends: it owns the compressor of their header blocks.
pub struct Encoder {
    deflate: Compress,
}

/// Reads the frames one end receives: it owns the decompressor of their header blocks.
pub struct Decoder {
    inflate: Decompress,
}

impl Encoder {
    pub fn new() -> Result<Self, StreamingError> {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(HEADER_DICTIONARY)
            .map_err(|e| StreamingError::Compression(e.to_string()))?;
        Ok(Self { deflate })
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), StreamingError> {
        let (kind, flags, payload) = match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(StreamingError::Protocol(format!(
                        "data frame of {} bytes is too long",
                        data.len()
                    )));
                }
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                push_length(out, u8::from(*fin) * FLAG_FIN, data.len());
                out.extend_from_slice(data);
                return Ok(());
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let mut payload = Vec::new();
                payload.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                payload.extend_from_slice(&(associated_to & 0x7fff_ffff).to_be_bytes());
                payload.extend_from_slice(&[(priority & 0x07) << 5, 0]);
                payload.extend(self.compress(headers)?);
                (TYPE_SYN_STREAM, *flags, payload)
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let kind = if matches!(frame, Frame::SynReply { .. }) {
                    TYPE_SYN_REPLY
                } else {
                    TYPE_HEADERS
                };
                let mut payload = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
                payload.extend(self.compress(headers)?);
                (kind, u8::from(*fin) * FLAG_FIN, payload)
            }
            Frame::RstStream { stream_id, status } => (
                TYPE_RST_STREAM,
                0,
                words(&[stream_id & 0x7fff_ffff, *status]),
            ),
            Frame::Settings { entries } => {
                let mut payload = (entries.len() as u32).to_be_bytes().to_vec();
                for (flags, id, value) in entries {
                    payload.push(*flags);
                    payload.extend_from_slice(&id.to_be_bytes()[1..]);
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                (TYPE_SETTINGS, 0, payload)
            }
            Frame::Ping { id } => (TYPE_PING, 0, words(&[*id])),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => (
                TYPE_GOAWAY,
                0,
                words(&[last_good_stream_id & 0x7fff_ffff, *status]),
            ),
            Frame::WindowUpdate { stream_id, delta } => (
                TYPE_WINDOW_UPDATE,
                0,
                words(&[stream_id & 0x7fff_ffff, delta & 0x7fff_ffff]),
            ),
            Frame::Unknown { kind } => {
                return Err(StreamingError::Protocol(format!(
                    "cannot send a frame of unknown type {kind}"
                )));
            }
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(StreamingError::Protocol(format!(
                "control frame of {} bytes is too long",
                payload.len()
            )));
        }
        out.extend_from_slice(
            &(0x8000_0000 | (u32::from(VERSION) << 16) | u32::from(kind)).to_be_bytes(),
        );
        push_length(out, flags, payload.len());
        out.extend_from_slice(&payload);
        Ok(())
    }

    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, StreamingError> {
        let mut names: Vec<&str> = Vec::new();
        for (name, _) in headers {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        let mut block = (names.len() as u32).to_be_bytes().to_vec();
        for name in names {
            let values: Vec<&str> = headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            let value = values.join("\0");
            let name = name.to_ascii_lowercase();
            for part in [name.as_bytes(), value.as_bytes()] {
                block.extend_from_slice(&(part.len() as u32).to_be_bytes());
                block.extend_from_slice(part);
            }
        }
        let start_in = self.deflate.total_in();
        let mut out = Vec::with_capacity(block.len() + 64);
        loop {
            let consumed = (self.deflate.total_in() - start_in) as usize;
            self.deflate
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| StreamingError::Compression(e.to_string()))?;
            let consumed = (self.deflate.total_in() - start_in) as usize;
            // A sync flush is complete once it leaves room in the output.
            if consumed == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            inflate: Decompress::new(true),
        }
    }
}

impl Decoder {
    /// Reads one frame from the front of `buf`: `None` until all its bytes are there,
    /// else the frame and how many bytes it took.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Frame, usize)>, StreamingError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let first = u32_at(buf, 0);
        let flags = buf[4];
        let length = (u32_at(buf, 4) & 0x00ff_ffff) as usize;
        let Some(payload) = buf.get(8..8 + length) else {
            return Ok(None);
        };
        let frame = if first & 0x8000_0000 == 0 {
            Frame::Data {
                stream_id: first & 0x7fff_ffff,
                fin: flags & FLAG_FIN != 0,
                data: payload.to_vec(),
            }
        } else {
            let version = ((first >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(StreamingError::Protocol(format!(
                    "SPDY version {version} is not supported"
                )));
            }
            self.control((first & 0xffff) as u16, flags, payload)?
        };
        Ok(Some((frame, 8 + length)))
    }

    fn control(&mut self, kind: u16, flags: u8, payload: &[u8]) -> Result<Frame, StreamingError> {
        let need = |n: usize| {
            if payload.len() < n {
                Err(StreamingError::Protocol(format!(
                    "control frame type {kind} is too short ({} bytes)",
                    payload.len()
                )))
            } else {
                Ok(())
            }
        };
        let fin = flags & FLAG_FIN != 0;
        Ok(match kind {
            TYPE_SYN_STREAM => {
                need(10)?;
                let headers = self.decompress(&payload[10..])?;
                Frame::SynStream {
                    stream_id: u32_at(payload, 0) & 0x7fff_ffff,
                    associated_to: u32_at(payload, 4) & 0x7fff_ffff,
                    priority: payload[8] >> 5,
                    flags,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                need(4)?;
                let stream_id = u32_at(payload, 0) & 0x7fff_ffff;
                let headers = self.decompress(&payload[4..])?;
                if kind == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                need(8)?;
                Frame::RstStream {
                    stream_id: u32_at(payload, 0) & 0x7fff_ffff,
                    status: u32_at(payload, 4),
                }
            }
            TYPE_SETTINGS => {
                need(4)?;
                let count = u32_at(payload, 0) as usize;
                need(count.saturating_mul(8).saturating_add(4))?;
                let entries = (0..count)
                    .map(|i| 4 + i * 8)
                    .map(|at| {
                        (
                            payload[at],
                            u32_at(payload, at) & 0x00ff_ffff,
                            u32_at(payload, at + 4),
                        )
                    })
                    .collect();
                Frame::Settings { entries }
            }
            TYPE_PING => {
                need(4)?;
                Frame::Ping {
                    id: u32_at(payload, 0),
                }
            }
            TYPE_GOAWAY => {
                need(8)?;
                Frame::GoAway {
                    last_good_stream_id: u32_at(payload, 0) & 0x7fff_ffff,
                    status: u32_at(payload, 4),
                }
            }
            TYPE_WINDOW_UPDATE => {
                need(8)?;
                Frame::WindowUpdate {
                    stream_id: u32_at(payload, 0) & 0x7fff_ffff,
                    delta: u32_at(payload, 4) & 0x7fff_ffff,
                }
            }
            kind => Frame::Unknown { kind },
        })
    }

    fn decompress(&mut self, input: &[u8]) -> Result<Headers, StreamingError> {
        let start_in = self.inflate.total_in();
        // Never room for more than one byte past the cap: that byte is how a block
        // too large shows, and nothing larger is ever inflated.
        let most = MAX_HEADER_BLOCK + 1;
        let mut block =
            Vec::with_capacity(input.len().saturating_mul(4).saturating_add(64).min(most));
        loop {
            let consumed = (self.inflate.total_in() - start_in) as usize;
            let produced = block.len();
            match self
                .inflate
                .decompress_vec(&input[consumed..], &mut block, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(error) if error.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(HEADER_DICTIONARY)
                        .map_err(|e| StreamingError::Compression(e.to_string()))?;
                    continue;
                }
                Err(error) => return Err(StreamingError::Compression(error.to_string())),
            }
            if block.len() > MAX_HEADER_BLOCK {
                return Err(StreamingError::Compression(format!(
                    "header block larger than {MAX_HEADER_BLOCK} bytes"
                )));
            }
            let now_consumed = (self.inflate.total_in() - start_in) as usize;
            // A sync flush is complete once it leaves room in the output.
            if now_consumed == input.len() && block.len() < block.capacity() {
                break;
            }
            if block.len() == block.capacity() {
                block.reserve_exact(block.capacity().min(most - block.len()));
            } else if now_consumed == consumed && block.len() == produced {
                return Err(StreamingError::Compression(
                    "header block is truncated".into(),
                ));
            }
        }
        parse_block(&block)
    }
}

fn parse_block(block: &[u8]) -> Result<Headers, StreamingError> {
    let mut reader = BlockReader { block, at: 0 };
    let count = reader.length()?;
    let mut headers = Headers::new();
    let mut list_size: usize = 0;
    for _ in 0..count {
        let name = reader.text()?.to_ascii_lowercase();
        let value = reader.text()?;
        for part in value.split('\0') {
            list_size = list_size.saturating_add(name.len() + part.len() + HEADER_ENTRY_COST);
            if list_size > MAX_HEADER_LIST {
                return Err(StreamingError::Protocol(format!(
                    "headers larger than {MAX_HEADER_LIST} bytes as a list"
                )));
            }
            headers.push((name.clone(), part.to_string()));
        }
    }
    Ok(headers)
}

/// Reads an inflated header block front to back; running out is an error.
struct BlockReader<'a> {
    block: &'a [u8],
    at: usize,
}

impl BlockReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], StreamingError> {
        let part = self
            .at
            .checked_add(n)
            .and_then(|end| self.block.get(self.at..end))
            .ok_or_else(|| StreamingError::Protocol("header block is cut short".into()))?;
        self.at += n;
        Ok(part)
    }

    fn length(&mut self) -> Result<usize, StreamingError> {
        let bytes = self.take(4)?;
        Ok(u32_at(bytes, 0) as usize)
    }

    fn text(&mut self) -> Result<String, StreamingError> {
        let length = self.length()?;
        String::from_utf8(self.take(length)?.to_vec())
            .map_err(|_| StreamingError::Protocol("header is not UTF-8".into()))
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

fn push_length(out: &mut Vec<u8>, flags: u8, length: usize) {
    out.extend_from_slice(
        &((u32::from(flags) << 24) | (length as u32 & 0x00ff_ffff)).to_be_bytes(),
    );
}

/// The SPDY/3 header dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1):
/// zlib is primed with it for every header block, in both directions.
pub const HEADER_DICTIONARY: &[u8] = b"\
    \x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00\
    \x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00\
    \x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-ranges\x00\
    \x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\x0dcache-c\
    ontrol\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-enco\
    ding\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\x00\x10conten\
    t-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\x00\x0cconten\
    t-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expi\
    res\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-mo\
    dified-since\x00\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmo\
    dified-since\x00\x00\x00\x0dlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-for\
    wards\x00\x00\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-autho\
    rization\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\
    \x06server\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\x11transfer-encoding\x00\
    \x00\x00\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04vary\x00\x00\x00\x03via\x00\
    \x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\x06method\x00\x00\x00\x03\
    get\x00\x00\x00\x06status\x00\x00\x00\x06200\x20OK\x00\x00\x00\x07version\x00\x00\x00\x08\
    HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\x0aset-cookie\x00\x00\x00\x0a\
    keep-alive\x00\x00\x00\x06origin10010120120220520630030230330430530630740240540640740840\
    9410411412413414415416417502504505203\x20Non-Authoritative\x20Information204\x20No\x20Co\
    ntent301\x20Moved\x20Permanently400\x20Bad\x20Request401\x20Unauthorized403\x20Forbidden\
    404\x20Not\x20Found500\x20Internal\x20Server\x20Error501\x20Not\x20Implemented503\x20Ser\
    vice\x20UnavailableJan\x20Feb\x20Mar\x20Apr\x20May\x20Jun\x20Jul\x20Aug\x20Sept\x20Oct\x20\
    Nov\x20Dec\x2000:00:00\x20Mon,\x20Tue,\x20Wed,\x20Thu,\x20Fri,\x20Sat,\x20Sun,\x20GMTchu\
    nked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/\
    plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-885\
    9-1,utf-,*,enq=0.";

#[cfg(test)]
mod tests;
