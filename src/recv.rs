//! A connection's receive buffer. Frame headers and small messages are read through it, while
//! a block's payload goes from the socket straight to its destination (its place in the file
//! map): each `readv` fills the rest of the payload first and lets only a few hundred bytes
//! past it (the next frame's header, usually) spill into the buffer. So a block costs about
//! one system call and is copied once, by the kernel.

use std::io::{self, IoSliceMut, Read};

use crate::storage::ReadInto;

/// How much a read may take past its destination: enough for the next frame header and a few
/// small messages, little enough that the next payload's bytes are rarely copied twice.
const SPILL: usize = 512;

pub struct RecvBuf<R> {
    src: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read> RecvBuf<R> {
    pub fn new(src: R) -> RecvBuf<R> {
        RecvBuf {
            src,
            buf: vec![0; SPILL].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The source, for settings that do not touch its bytes (a socket's timeout).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.src
    }

    /// Bytes read from the source and not yet consumed: what can be had without a system call.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether the source has ended with nothing left to read: waits for data when none is
    /// buffered. Asked between frames, so a peer that closes the connection there is told
    /// apart from one that breaks off inside a frame. The read goes into the buffer, where
    /// the next `read_exact` takes it from: still one system call per wake-up.
    pub fn at_eof(&mut self) -> io::Result<bool> {
        while self.start == self.end {
            match self.src.read(&mut self.buf) {
                Ok(0) => return Ok(true),
                Ok(got) => {
                    self.start = 0;
                    self.end = got;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Fills all of `dst`: from the buffer first, then with vectored reads.
    pub fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let n = (self.end - self.start).min(dst.len());
        dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        let mut filled = n;
        while filled < dst.len() {
            // The buffer is empty here.
            self.start = 0;
            self.end = 0;
            let want = dst.len() - filled;
            let mut iov = [
                IoSliceMut::new(&mut dst[filled..]),
                IoSliceMut::new(&mut self.buf),
            ];
            let got = match self.src.read_vectored(&mut iov) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if got <= want {
                filled += got;
            } else {
                filled = dst.len();
                self.end = got - want;
            }
        }
        Ok(())
    }

    /// Reads and drops `n` bytes (a block nobody wants written).
    pub fn skip(&mut self, mut n: usize) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len());
            self.read_exact(&mut scratch[..k])?;
            n -= k;
        }
        Ok(())
    }
}

impl<R: Read> ReadInto for RecvBuf<R> {
    fn read_into(&mut self, dst: &mut [u8]) -> io::Result<()> {
        self.read_exact(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `chunk` bytes per call, into the first buffer only when `vectored`
    /// is false (as `Read`'s default `read_vectored` does).
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        calls: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn mixed_sizes_come_back_in_order_through_vectored_reads() {
        let data = bytes(100_000);
        let mut r = RecvBuf::new(&data[..]);
        let mut out = Vec::new();
        for size in [4, 1, 16384, 13, 3, 16384, 700, 2048, 9, 50_000] {
            let mut part = vec![0; size];
            r.read_exact(&mut part).unwrap();
            out.extend_from_slice(&part);
        }
        r.skip(data.len() - out.len() - 10).unwrap();
        let mut tail = [0u8; 10];
        r.read_exact(&mut tail).unwrap();
        assert_eq!(out, data[..out.len()]);
        assert_eq!(tail, data[data.len() - 10..]);
        let mut more = [0u8; 1];
        assert_eq!(
            r.read_exact(&mut more).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_large_read_spills_little_into_the_buffer() {
        let data = bytes(64 * 1024);
        let mut r = RecvBuf::new(&data[..]);
        let mut block = vec![0; 16384];
        r.read_exact(&mut block).unwrap();
        assert_eq!(block, data[..16384]);
        // Only the spill was taken past the block; the rest stays in the source.
        assert_eq!(r.end - r.start, SPILL);
    }

    #[test]
    fn eof_is_seen_only_when_nothing_is_left() {
        let data = bytes(600);
        let mut r = RecvBuf::new(&data[..]);
        assert!(!r.at_eof().unwrap());
        assert_eq!(r.buffered(), SPILL);
        let mut all = vec![0; 599];
        r.read_exact(&mut all).unwrap();
        assert!(!r.at_eof().unwrap(), "one byte is left");
        r.skip(1).unwrap();
        assert!(r.at_eof().unwrap());
        assert!(r.at_eof().unwrap(), "and stays at the end");
    }

    #[test]
    fn short_reads_from_a_plain_reader_still_fill_everything() {
        let data = bytes(40_000);
        let mut src = Trickle {
            data: data.clone(),
            at: 0,
            chunk: 1000,
            calls: 0,
        };
        let mut got = vec![0; 40_000];
        {
            let mut r = RecvBuf::new(&mut src);
            r.read_exact(&mut got[..5]).unwrap();
            r.read_exact(&mut got[5..]).unwrap();
        }
        assert_eq!(got, data);
        assert!(src.calls >= 40);
    }
}
