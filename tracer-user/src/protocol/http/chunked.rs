//! Chunked transfer coding (RFC 9112 7.1): where a chunked body ends.

/// Walks a chunked body (RFC 9112 7.1) to find its end. Chunk data is skipped by length, so
/// only the size lines need to have been captured; when one was not, the end is lost.
#[derive(Clone, Copy, Debug)]
pub(super) enum ChunkDecoder {
    Size {
        value: u64,
        digits: u8,
    },
    /// Extensions or whitespace after the size, up to the line end.
    Ext {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    Trailer {
        line_start: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// All the given bytes belong to the body, which goes on.
    More,
    /// The body ended after `consumed` bytes.
    Done,
    /// Uncaptured or malformed framing: the end of the body cannot be found.
    Lost,
}

pub(super) struct Advance {
    pub consumed: u64,
    pub outcome: Outcome,
}

impl ChunkDecoder {
    pub const START: Self = ChunkDecoder::Size {
        value: 0,
        digits: 0,
    };

    /// Advances over the next `total` bytes of the stream, of which `captured` is a prefix.
    pub fn advance(&mut self, captured: &[u8], total: u64) -> Advance {
        let mut i = 0u64;
        while i < total {
            if let ChunkDecoder::Data(n) = *self {
                let take = n.min(total - i);
                i += take;
                *self = if take == n {
                    ChunkDecoder::DataCr
                } else {
                    ChunkDecoder::Data(n - take)
                };
                continue;
            }
            let Some(&b) = usize::try_from(i).ok().and_then(|k| captured.get(k)) else {
                return Advance {
                    consumed: i,
                    outcome: Outcome::Lost,
                };
            };
            i += 1;
            let next = match (*self, b) {
                (ChunkDecoder::Size { value, digits }, _) if b.is_ascii_hexdigit() => {
                    // 15 hex digits are already more than any real body.
                    if digits >= 15 {
                        return Advance {
                            consumed: i,
                            outcome: Outcome::Lost,
                        };
                    }
                    let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                    ChunkDecoder::Size {
                        value: value << 4 | digit,
                        digits: digits + 1,
                    }
                }
                (ChunkDecoder::Size { value, digits }, b';' | b' ' | b'\t') if digits > 0 => {
                    ChunkDecoder::Ext { value }
                }
                (ChunkDecoder::Size { value, digits }, b'\r') if digits > 0 => {
                    ChunkDecoder::SizeLf { value }
                }
                (ChunkDecoder::Size { value, digits }, b'\n') if digits > 0 => {
                    Self::after_size(value)
                }
                (ChunkDecoder::Ext { value } | ChunkDecoder::SizeLf { value }, b'\n') => {
                    Self::after_size(value)
                }
                (ChunkDecoder::Ext { value }, _) => ChunkDecoder::Ext { value },
                (ChunkDecoder::DataCr, b'\r') => ChunkDecoder::DataLf,
                (ChunkDecoder::DataCr | ChunkDecoder::DataLf, b'\n') => Self::START,
                (ChunkDecoder::Trailer { line_start: true }, b'\n') => {
                    return Advance {
                        consumed: i,
                        outcome: Outcome::Done,
                    };
                }
                (ChunkDecoder::Trailer { .. }, b'\n') => ChunkDecoder::Trailer { line_start: true },
                (ChunkDecoder::Trailer { line_start }, b'\r') => {
                    ChunkDecoder::Trailer { line_start }
                }
                (ChunkDecoder::Trailer { .. }, _) => ChunkDecoder::Trailer { line_start: false },
                _ => {
                    return Advance {
                        consumed: i,
                        outcome: Outcome::Lost,
                    }
                }
            };
            *self = next;
        }
        Advance {
            consumed: total,
            outcome: Outcome::More,
        }
    }

    fn after_size(value: u64) -> Self {
        if value == 0 {
            ChunkDecoder::Trailer { line_start: true }
        } else {
            ChunkDecoder::Data(value)
        }
    }
}
