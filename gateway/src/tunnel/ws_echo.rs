//! The secret in WebSocket messages. Toward a host whose rule attaches a credential, an
//! upstream that sends it back in a message (a debugging endpoint, an error quoting the
//! handshake) would hand it to the sandbox, as an answer could ([`super::response_scan`]).
//! What the upstream sends after the upgrade is read as frames ([`Frames`]), each message's
//! payload joined across frames and reads, and the connection is cut before anything of the
//! secret reaches the client. A message's last bytes, as many as a secret less one, wait
//! until the next bytes show whether the rest follows; a message's end releases them (a
//! message is read whole by the client).

use super::{
    response_scan::Echoes,
    ws_scan::{Cut, Frames},
};

/// The most bytes held back at once. What may begin the secret is shorter than it; a frame
/// header or a control frame not whole yet, at most 14 and 139 bytes; only frames that carry
/// no payload of the message, after such a start, could make it more.
pub const MAX_HELD: usize = 16 << 10;

/// The upstream-to-client byte stream of one WebSocket, read as frames and relayed as far as
/// it is known not to carry the secret.
pub struct EchoScan {
    echoes: Echoes,
    frames: Frames,
    /// The current message's payload from the first byte that may begin the secret: those
    /// held back by earlier reads, then this read's.
    window: Vec<u8>,
    /// Where each run of `window` sits in the stream: (index in `window`, stream offset).
    /// Frame headers, and control frames, come between a message's payload runs.
    runs: Vec<(usize, u64)>,
    /// The payload of the control frame being read (at most 125 bytes): held back whole, since
    /// it is read apart from the message it may come in the middle of.
    control: Vec<u8>,
    in_control: bool,
    /// Whether the current data frame ends its message.
    fin: bool,
    /// Where the current frame begins: while its header, or a control frame, is not whole,
    /// it is held back from there.
    frame_start: u64,
    /// The stream offset after the last byte fed.
    pos: u64,
    /// The bytes fed and not relayed yet (they end at `pos`).
    held: Vec<u8>,
    /// How many bytes at the front of `held` the last `feed` handed out to be relayed.
    relayed: usize,
}

/// Its buffers hold what may be the start of the secret, and at a cut the whole of it:
/// wiped, as the tunnel's own copies of the secret are (hyper's are not).
impl Drop for EchoScan {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.window.zeroize();
        self.control.zeroize();
        self.held.zeroize();
    }
}

impl EchoScan {
    pub fn new(echoes: Echoes) -> Self {
        Self {
            echoes,
            frames: Frames::default(),
            window: Vec::new(),
            runs: Vec::new(),
            control: Vec::new(),
            in_control: false,
            fin: false,
            frame_start: 0,
            pos: 0,
            held: Vec::new(),
            relayed: 0,
        }
    }

    /// Reads the next bytes the upstream sent; what of them, and of bytes held back before,
    /// may go to the client now. `Err`: nothing more may.
    pub fn feed<'a>(&'a mut self, read: &'a [u8]) -> Result<&'a [u8], Cut> {
        self.held.drain(..self.relayed);
        self.relayed = 0;
        let start = self.pos;
        let mut rest = read;
        while !rest.is_empty() {
            let at = start + (read.len() - rest.len()) as u64;
            if self.frames.in_header() {
                if !self.frames.header_begun() {
                    self.frame_start = at;
                }
                let Some(header) = self.frames.header(&mut rest)? else {
                    continue;
                };
                self.in_control = header.control;
                if !header.control {
                    self.fin = header.fin;
                }
                if header.len == 0 {
                    self.frame_end()?;
                }
                continue;
            }
            let ended = if self.in_control {
                self.frames.payload(&mut rest, &mut self.control)
            } else {
                self.runs.push((self.window.len(), at));
                self.frames.payload(&mut rest, &mut self.window)
            };
            if ended {
                self.frame_end()?;
            }
        }
        self.pos = start + read.len() as u64;
        if self.echoes.found_in(&self.window) {
            return Err(Cut::Secret);
        }
        let keep = usize::try_from(self.pos - self.hold_from()).unwrap_or(usize::MAX);
        if keep > MAX_HELD {
            return Err(Cut::HeldTooLong);
        }
        Ok(self.release(read, keep))
    }

    fn frame_end(&mut self) -> Result<(), Cut> {
        if self.in_control {
            self.in_control = false;
            let found = self.echoes.found_in(&self.control);
            self.control.clear();
            return if found { Err(Cut::Secret) } else { Ok(()) };
        }
        if self.fin {
            // The message is whole: what it ends with cannot continue into the next one.
            let found = self.echoes.found_in(&self.window);
            self.window.clear();
            self.runs.clear();
            if found {
                return Err(Cut::Secret);
            }
        }
        Ok(())
    }

    /// The stream offset from which bytes wait for the next read: the message's last
    /// payload bytes, as many as a secret less one whatever they are (if only those that
    /// could begin the secret waited, when they went would tell the client which guesses
    /// begin it), or the start of a frame not whole enough to judge. Drops from `window`
    /// what no longer needs to be looked at.
    fn hold_from(&mut self) -> u64 {
        let pending = self
            .window
            .len()
            .min(self.echoes.longest().saturating_sub(1));
        let first = self.window.len() - pending;
        let mut from = self.pos;
        if pending == 0 {
            self.runs.clear();
        } else {
            let run = self
                .runs
                .iter()
                .rposition(|&(index, _)| index <= first)
                .unwrap_or(0);
            let (index, offset) = self.runs[run];
            from = offset + (first - index) as u64;
            self.runs.drain(..run);
            self.runs[0] = (first, from);
            for r in &mut self.runs {
                r.0 -= first;
            }
        }
        self.window.drain(..first);
        if self.in_control || self.frames.header_begun() {
            from = from.min(self.frame_start);
        }
        from
    }

    /// What may be relayed of `held` and `read` when the last `keep` bytes of them may not.
    fn release<'a>(&'a mut self, read: &'a [u8], keep: usize) -> &'a [u8] {
        if self.held.is_empty() {
            // The usual case: nothing held back before, relayed from the read itself.
            let send = read.len().saturating_sub(keep);
            self.held.extend_from_slice(&read[send..]);
            return &read[..send];
        }
        self.held.extend_from_slice(read);
        self.relayed = self.held.len().saturating_sub(keep);
        &self.held[..self.relayed]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    const SECRET: &str = "s3cret-value-0123456789";

    /// A server frame as RFC 6455 5.2 lays it out: FIN, opcode, length, no mask.
    fn frame(opcode: u8, payload: &[u8], fin: bool) -> Vec<u8> {
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    fn text(payload: &str) -> Vec<u8> {
        frame(0x1, payload.as_bytes(), true)
    }

    fn scan() -> EchoScan {
        let echoes = Arc::from([Bytes::from_static(SECRET.as_bytes())]);
        EchoScan::new(Echoes::new(&echoes).unwrap())
    }

    /// Feeds `bytes` in pieces of `step`: what was relayed, and the index of the piece cut.
    fn relayed_in_steps(bytes: &[u8], step: usize) -> (Vec<u8>, Option<usize>) {
        let mut s = scan();
        let mut relayed = Vec::new();
        for (i, piece) in bytes.chunks(step).enumerate() {
            match s.feed(piece) {
                Ok(out) => relayed.extend_from_slice(out),
                Err(cut) => {
                    assert_eq!(cut, Cut::Secret);
                    return (relayed, Some(i));
                }
            }
        }
        (relayed, None)
    }

    fn contains(haystack: &[u8], text: &str) -> bool {
        haystack.windows(text.len()).any(|w| w == text.as_bytes())
    }

    #[test]
    fn messages_without_the_secret_are_relayed_unchanged_in_any_split() {
        let mut bytes = text("hello");
        // Ends with what begins the secret, then does not go on with it.
        bytes.extend(frame(0x1, b"almost s3cret-val", false));
        bytes.extend(frame(0x9, b"ping", true));
        bytes.extend(frame(0x0, b"ue-0123 but not quite", true));
        bytes.extend(frame(0x2, &vec![b's'; 70_000], true));
        bytes.extend(frame(0x1, b"", true));
        bytes.extend(text("trailing s3cret"));
        for step in [1, 2, 3, 7, 14, 100, 4096, bytes.len()] {
            assert_eq!(
                relayed_in_steps(&bytes, step),
                (bytes.clone(), None),
                "step {step}"
            );
        }
    }

    #[test]
    fn a_message_s_last_bytes_wait_for_the_next_read_whatever_they_are() {
        let mut s = scan();
        let first = frame(0x1, b"a s3c", false);
        // The frame's header goes at once; its payload, shorter than a secret, waits.
        assert_eq!(s.feed(&first).unwrap(), &first[..first.len() - 5]);
        let rest = frame(0x0, b"ond thing", true);
        let mut want = b"a s3c".to_vec();
        want.extend_from_slice(&rest);
        assert_eq!(s.feed(&rest).unwrap(), want);
        // Other text waits the same: when bytes go tells nothing of what they are.
        let other = frame(0x1, b"a xyz", false);
        assert_eq!(scan().feed(&other).unwrap(), &other[..other.len() - 5]);
        // A message ending with it is relayed whole: the next cannot continue it.
        let whole = text("ends with s3cret-val");
        assert_eq!(s.feed(&whole).unwrap(), whole);
    }

    #[test]
    fn the_secret_whole_in_one_frame_is_cut_before_any_of_its_frame() {
        let mut bytes = text("before");
        let carrying = text(&format!("your auth: Bearer {SECRET}"));
        bytes.extend(&carrying);
        let (relayed, cut) = relayed_in_steps(&bytes, bytes.len());
        assert_eq!((relayed, cut), (Vec::new(), Some(0)));
        // Read apart, the message before it is relayed and nothing of its frame.
        let mut s = scan();
        assert_eq!(s.feed(&text("before")).unwrap(), text("before"));
        assert_eq!(s.feed(&carrying).map(<[u8]>::to_vec), Err(Cut::Secret));
    }

    #[test]
    fn the_secret_split_across_reads_is_cut_before_any_of_it_is_relayed() {
        let mut bytes = text("before");
        bytes.extend(text(&format!("your auth: Bearer {SECRET} and more")));
        let end = bytes
            .windows(SECRET.len())
            .position(|w| w == SECRET.as_bytes())
            .unwrap()
            + SECRET.len();
        for step in [1, 2, 5, 13, 30] {
            let (relayed, cut) = relayed_in_steps(&bytes, step);
            // Cut at the read that completes it, not later.
            assert_eq!(cut, Some((end - 1) / step), "step {step}");
            assert!(relayed.starts_with(&text("before")), "step {step}");
            assert!(
                !contains(&relayed, &SECRET[..2]),
                "step {step}: {relayed:?}"
            );
        }
    }

    #[test]
    fn the_secret_split_across_fragments_is_cut() {
        let (a, b) = SECRET.split_at(9);
        let mut bytes = frame(0x1, format!("your auth: {a}").as_bytes(), false);
        // A ping may come between the fragments; the message does not include it.
        bytes.extend(frame(0xA, b"pong", true));
        bytes.extend(frame(0x0, b.as_bytes(), true));
        for step in [1, 3, 16, bytes.len()] {
            let (relayed, cut) = relayed_in_steps(&bytes, step);
            assert!(cut.is_some(), "step {step}");
            assert!(!contains(&relayed, &a[..1]), "step {step}: {relayed:?}");
        }
        // Frames read apart: the first fragment's header goes, its payload (shorter than a
        // secret) waits.
        let mut s = scan();
        let payload = format!("your auth: {a}");
        let first = frame(0x1, payload.as_bytes(), false);
        assert_eq!(
            s.feed(&first).unwrap(),
            &first[..first.len() - payload.len()]
        );
        let second = frame(0x0, b.as_bytes(), true);
        assert_eq!(s.feed(&second).map(<[u8]>::to_vec), Err(Cut::Secret));
    }

    #[test]
    fn control_frames_are_read_whole_and_compressed_frames_cut() {
        let ping = frame(0x9, format!("x{SECRET}").as_bytes(), true);
        for step in [1, 4, ping.len()] {
            let (relayed, cut) = relayed_in_steps(&ping, step);
            assert_eq!((relayed, cut.is_some()), (Vec::new(), true), "step {step}");
        }
        let mut compressed = text("x");
        compressed[0] |= 0x40;
        assert_eq!(
            scan().feed(&compressed).map(<[u8]>::to_vec),
            Err(Cut::Extension)
        );
    }

    #[test]
    fn pings_after_what_may_begin_the_secret_are_held_up_to_a_bound() {
        let mut s = scan();
        let first = frame(0x1, b"your auth: s3c", false);
        assert_eq!(s.feed(&first).unwrap(), &first[..first.len() - 14]);
        let ping = frame(0x9, &[b'x'; 125], true);
        let mut held = 14;
        while held + ping.len() <= MAX_HELD {
            assert_eq!(s.feed(&ping).unwrap(), b"");
            held += ping.len();
        }
        assert_eq!(s.feed(&ping).map(<[u8]>::to_vec), Err(Cut::HeldTooLong));
    }
}
