//! Placeholders in WebSocket messages. Toward a host whose rule does not name a placeholder's
//! credential, what the client sends after the upgrade is read frame by frame, and the
//! connection is cut before the read that would complete a placeholder is passed on, as for
//! request bodies (see [`super::body_scan`]). The framing, [`Frames`], is read the same way
//! for the secret in what the upstream sends ([`super::ws_echo`]).

use std::io::Cursor;

use tungstenite::protocol::frame::{FrameHeader, coding::OpCode};

use super::body_scan::Needles;

/// Why one side of a WebSocket was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A placeholder of a credential this host's rule does not name, from the client.
    Placeholder,
    /// The secret of the credential attached toward this host, from the upstream.
    Secret,
    /// A frame an extension transformed (an RSV bit set, as permessage-deflate does): its
    /// payload cannot be read as sent. The tunnel drops `Sec-WebSocket-Extensions` from such
    /// a handshake, so only a peer that ignores the negotiation sends one.
    Extension,
    /// Bytes that are not a WebSocket frame header.
    NotAFrame,
    /// More than [`super::ws_echo::MAX_HELD`] bytes from the upstream held back at once:
    /// frames without payload (pings, empty fragments) after the start of a message's text
    /// that may begin the secret, which would otherwise be held without end.
    HeldTooLong,
}

const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A frame header, once whole.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Close, ping or pong: at most 125 bytes, never fragmented, and allowed between the
    /// fragments of a message, which do not include it.
    pub control: bool,
    /// The last frame of its message.
    pub fin: bool,
    /// Payload length.
    pub len: u64,
}

/// One direction of a WebSocket read as frames as its bytes arrive (RFC 6455 5.2): headers
/// parsed by tungstenite, payloads unmasked (the client's are masked, the server's not).
#[derive(Default)]
pub struct Frames {
    /// A frame header not complete yet.
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    left: u64,
    mask: Option<[u8; 4]>,
    /// Position in the current frame's payload, for the mask.
    at: usize,
}

impl Frames {
    /// True when the next bytes are (part of) a frame header.
    pub fn in_header(&self) -> bool {
        self.left == 0
    }

    /// True when a header was begun and is not whole yet.
    pub fn header_begun(&self) -> bool {
        !self.header.is_empty()
    }

    /// Takes header bytes from the front of `bytes`; the header once it is whole. Only when
    /// [`Self::in_header`].
    pub fn header(&mut self, bytes: &mut &[u8]) -> Result<Option<Header>, Cut> {
        // The longest header: 2 bytes, an 8-byte length, a 4-byte mask.
        const LONGEST: usize = 14;
        let taken = (LONGEST - self.header.len()).min(bytes.len());
        self.header.extend_from_slice(&bytes[..taken]);
        let mut cursor = Cursor::new(&self.header[..]);
        match FrameHeader::parse(&mut cursor) {
            Ok(Some((header, len))) => {
                let used = usize::try_from(cursor.position()).map_err(|_| Cut::NotAFrame)?;
                let beyond = self.header.len() - used;
                self.header.clear();
                if header.rsv1 || header.rsv2 || header.rsv3 {
                    return Err(Cut::Extension);
                }
                let control = matches!(header.opcode, OpCode::Control(_));
                // RFC 6455 5.5: a control frame is never fragmented and carries at most 125
                // bytes, all of which a reader holds.
                if control && (len > MAX_CONTROL_PAYLOAD || !header.is_final) {
                    return Err(Cut::NotAFrame);
                }
                self.mask = header.mask;
                self.left = len;
                self.at = 0;
                *bytes = &bytes[taken - beyond..];
                Ok(Some(Header {
                    control,
                    fin: header.is_final,
                    len,
                }))
            }
            Ok(None) if self.header.len() < LONGEST => {
                *bytes = &bytes[taken..];
                Ok(None)
            }
            Ok(None) | Err(_) => Err(Cut::NotAFrame),
        }
    }

    /// Moves the current frame's payload bytes from the front of `bytes` onto `into`,
    /// unmasked; true when that completes the frame. Only when not [`Self::in_header`].
    pub fn payload(&mut self, bytes: &mut &[u8], into: &mut Vec<u8>) -> bool {
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let start = into.len();
        into.extend_from_slice(&bytes[..n]);
        if let Some(mask) = self.mask {
            for (i, b) in into[start..].iter_mut().enumerate() {
                *b ^= mask[(self.at + i) % 4];
            }
        }
        self.at += n;
        self.left -= n as u64;
        *bytes = &bytes[n..];
        self.left == 0
    }
}

/// The client-to-upstream byte stream of one WebSocket, read as frames.
pub struct FrameScan {
    needles: Needles,
    frames: Frames,
    /// The last `needles.keep` data payload bytes seen, unmasked, then the current read's: a
    /// placeholder split across reads or fragments is seen whole.
    window: Vec<u8>,
    /// The payload of the control frame being read (at most 125 bytes), apart: one may come
    /// between the fragments of a message, which the upstream joins without it.
    control: Option<Vec<u8>>,
}

impl FrameScan {
    pub fn new(placeholders: Vec<String>) -> Self {
        Self {
            needles: Needles::new(placeholders),
            frames: Frames::default(),
            window: Vec::new(),
            control: None,
        }
    }

    /// Reads the next bytes the client sent. `Err` means they must not be passed on.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Cut> {
        while !bytes.is_empty() {
            if self.frames.in_header() {
                if let Some(header) = self.frames.header(&mut bytes)? {
                    self.control = header.control.then(Vec::new);
                }
                continue;
            }
            let payload = self.control.as_mut().unwrap_or(&mut self.window);
            if self.frames.payload(&mut bytes, payload)
                && let Some(control) = self.control.take()
                && self.needles.found_in(&control)
            {
                return Err(Cut::Placeholder);
            }
        }
        let in_control = self
            .control
            .as_ref()
            .is_some_and(|c| self.needles.found_in(c));
        if in_control || self.needles.found_in(&self.window) {
            return Err(Cut::Placeholder);
        }
        let drop = self.window.len().saturating_sub(self.needles.keep);
        self.window.drain(..drop);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLACEHOLDER: &str = "gw-placeholder-0123456789abcdef";

    /// A client frame as RFC 6455 5.2 lays it out: FIN, opcode, MASK bit, length, mask.
    fn frame(opcode: u8, payload: &[u8], mask: [u8; 4], fin: bool) -> Vec<u8> {
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn scan() -> FrameScan {
        FrameScan::new(vec![PLACEHOLDER.into()])
    }

    /// Feeds `bytes` in pieces of `step`; the index of the piece that was refused.
    fn fed_in_steps(bytes: &[u8], step: usize) -> Result<(), (usize, Cut)> {
        let mut s = scan();
        for (i, piece) in bytes.chunks(step).enumerate() {
            s.feed(piece).map_err(|c| (i, c))?;
        }
        Ok(())
    }

    #[test]
    fn clean_frames_pass_in_any_split() {
        let mut bytes = frame(0x1, b"hello", [1, 2, 3, 4], true);
        bytes.extend(frame(0x2, &[7u8; 300], [9, 9, 9, 9], true));
        bytes.extend(frame(0x2, &vec![b'x'; 70_000], [5, 6, 7, 8], true));
        bytes.extend(frame(0x9, b"ping", [0, 0, 0, 1], true));
        for step in [1, 2, 3, 7, 14, 100, 4096, bytes.len()] {
            assert_eq!(fed_in_steps(&bytes, step), Ok(()), "step {step}");
        }
    }

    #[test]
    fn a_masked_placeholder_is_found_in_any_split() {
        let text = format!("token={PLACEHOLDER}&more");
        let mut bytes = frame(0x1, b"first", [1, 2, 3, 4], true);
        bytes.extend(frame(0x1, text.as_bytes(), [0xde, 0xad, 0xbe, 0xef], true));
        let start = bytes.len() - text.len() + "token=".len();
        let end = start + PLACEHOLDER.len();
        for step in [1, 2, 5, 13, 64, bytes.len()] {
            let (piece, cut) = fed_in_steps(&bytes, step).unwrap_err();
            assert_eq!(cut, Cut::Placeholder);
            // Refused at the read that completes it, never later, and nothing before it.
            assert_eq!(piece, (end - 1) / step, "step {step}");
        }
        assert!(
            !bytes
                .windows(PLACEHOLDER.len())
                .any(|w| w == PLACEHOLDER.as_bytes())
        );
    }

    #[test]
    fn a_placeholder_split_across_fragments_is_found() {
        let (a, b) = PLACEHOLDER.split_at(10);
        let mut bytes = frame(0x1, a.as_bytes(), [1, 2, 3, 4], false);
        bytes.extend(frame(0x0, b.as_bytes(), [4, 3, 2, 1], true));
        assert_eq!(
            fed_in_steps(&bytes, bytes.len()).map_err(|(_, c)| c),
            Err(Cut::Placeholder)
        );
    }

    #[test]
    fn a_control_frame_between_fragments_does_not_hide_a_placeholder() {
        let (a, b) = PLACEHOLDER.split_at(10);
        let mut bytes = frame(0x1, format!("token={a}").as_bytes(), [1, 2, 3, 4], false);
        bytes.extend(frame(0x9, b"x", [5, 6, 7, 8], true));
        bytes.extend(frame(0x0, b.as_bytes(), [4, 3, 2, 1], true));
        for step in [1, 3, 16, bytes.len()] {
            assert_eq!(
                fed_in_steps(&bytes, step).map_err(|(_, c)| c),
                Err(Cut::Placeholder),
                "step {step}"
            );
        }
        // A control frame's own payload is read too.
        let ping = frame(0x9, PLACEHOLDER.as_bytes(), [9, 8, 7, 6], true);
        for step in [1, 7, ping.len()] {
            assert_eq!(
                fed_in_steps(&ping, step).map_err(|(_, c)| c),
                Err(Cut::Placeholder),
                "step {step}"
            );
        }
    }

    #[test]
    fn extension_frames_and_garbage_are_cut() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut compressed = frame(0x1, b"x", [1, 2, 3, 4], true);
            compressed[0] |= rsv;
            assert_eq!(scan().feed(&compressed), Err(Cut::Extension));
        }
        // Control frames: 125 bytes at most, never fragmented (RFC 6455 5.5).
        assert_eq!(
            scan().feed(&frame(0x9, &[b'x'; 126], [1, 2, 3, 4], true)),
            Err(Cut::NotAFrame)
        );
        assert_eq!(
            scan().feed(&frame(0x9, b"x", [1, 2, 3, 4], false)),
            Err(Cut::NotAFrame)
        );
        assert_eq!(
            scan().feed(&frame(0x9, &[b'x'; 125], [1, 2, 3, 4], true)),
            Ok(())
        );
        // Opcode 3 is reserved (RFC 6455 5.2).
        assert_eq!(
            scan().feed(&frame(0x3, b"x", [1, 2, 3, 4], true)),
            Err(Cut::NotAFrame)
        );
    }
}
