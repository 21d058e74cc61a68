//! Streaming (`-O -`): one file's content to a writer, in order, as pieces verify.
//!
//! The picker works inside a window of pieces just ahead of the stream; the session hands each
//! verified piece, in order, to a streamer thread that reads the file's share of it back with
//! `pread` and writes it out. Nothing unverified is ever written, memory is one piece buffer,
//! and a slow reader only slows the writes (the data waits on disk, not in memory). A closed
//! pipe ends the run cleanly.

use std::io::{self, Write};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use super::{Session, spawn_reporting};
use crate::error::Error;
use crate::geometry::PieceIndex;
use crate::messages::Input;
use crate::storage::Storage;

/// How far ahead of the stream pieces are fetched, in bytes (at least 8 pieces).
const WINDOW_BYTES: u64 = 16 << 20;

pub struct Stream {
    /// Verified pieces, in order, to the streamer thread; dropped after the last one.
    tx: Option<Sender<PieceIndex>>,
    /// Next piece to hand to the streamer.
    next: u32,
    /// One past the file's last piece.
    end: u32,
    window: u32,
}

fn spawn_streamer(
    storage: Arc<Storage>,
    range: (u64, u64),
    mut sink: Box<dyn Write + Send>,
    out: Sender<Input>,
) -> Result<(Sender<PieceIndex>, JoinHandle<()>), Error> {
    // Each piece of the file goes in once, in order: at most the file's piece count.
    let (tx, rx) = crossbeam_channel::unbounded::<PieceIndex>();
    let report = out.clone();
    let thread = spawn_reporting("stream", "streamer", 128 * 1024, &report, move || {
        let g = storage.geometry().clone();
        let mut buf = Vec::new();
        for piece in rx {
            let p_start = g.piece_offset(piece);
            let p_end = p_start + u64::from(g.piece_len(piece));
            let (start, end) = (p_start.max(range.0), p_end.min(range.1));
            if end <= start {
                continue;
            }
            buf.resize((end - start) as usize, 0);
            let result = storage
                .read(start, &mut buf)
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|()| sink.write_all(&buf));
            if let Err(e) = result {
                let msg = if e.kind() == io::ErrorKind::BrokenPipe {
                    Input::StreamClosed
                } else {
                    Input::StreamFailed(e)
                };
                let _ = out.send(msg);
                return;
            }
        }
        let msg = match sink.flush() {
            Ok(()) => Input::StreamDone,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Input::StreamClosed,
            Err(e) => Input::StreamFailed(e),
        };
        let _ = out.send(msg);
    })?;
    Ok((tx, thread))
}

impl Session {
    pub(super) fn start_stream(
        &mut self,
        file: usize,
        sink: Box<dyn Write + Send>,
    ) -> Result<(), Error> {
        let g = self.picker.geometry().clone();
        let range = (g.file_start(file), g.file_start(file) + g.file_len(file));
        let pieces = g.pieces_of_file(file);
        let window = (WINDOW_BYTES / u64::from(g.nominal_piece_len())).max(8) as u32;
        let (tx, thread) = spawn_streamer(
            Arc::clone(&self.ctx.storage),
            range,
            sink,
            self.input_tx.clone(),
        )?;
        self.threads.streamer = Some(thread);
        self.stream = Some(Stream {
            tx: Some(tx),
            next: pieces.start,
            end: pieces.end,
            window,
        });
        self.advance_stream();
        Ok(())
    }

    /// Hands every verified piece at the head of the stream to the streamer, and moves the
    /// picker's window along.
    pub(super) fn advance_stream(&mut self) {
        let Some(s) = &mut self.stream else {
            return;
        };
        let have = self.picker.have_flags();
        while s.next < s.end && have[s.next as usize] {
            if let (Some(tx), Some(p)) = (&s.tx, self.picker.geometry().piece(s.next)) {
                let _ = tx.send(p);
            }
            s.next += 1;
        }
        if s.next >= s.end {
            // The streamer drains what it has and reports StreamDone.
            s.tx = None;
        } else {
            self.picker.set_window(s.next, s.window);
        }
    }
}
