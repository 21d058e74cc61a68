//! What flows over the connections: interest, request pipelines, blocks into storage, hash
//! results, and choking.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Session;
use super::peers::{MAX_HASH_FAILS, MAX_UNREQUESTED, Peer};
use crate::choker::PeerView;
use crate::engine::{Event, NoticeKind};
use crate::error::Error;
use crate::geometry::{BLOCK_LEN, BlockRef, PieceIndex};
use crate::messages::{Command, PeerEvent};
use crate::picker::{BlockOutcome, PeerKey};
use crate::tracker::TrackerCommand;

/// Request pipeline bounds, in blocks. The depth is the peer's measured rate times its round
/// trip plus [`DEPTH_SLACK`]: the bandwidth-delay product with room for jitter and for the
/// rate to grow (each round trip the pipeline allows `1 + slack / rtt` times the last rate,
/// so it opens up to the link within a few round trips). Until a round trip is measured, one
/// second stands in for it. A deeper pipeline buys nothing and costs memory: every piece in
/// flight stays resident until it verifies, which on many slow peers adds up. Within the
/// peer's `reqq` when it told us one; [`NO_REQQ_DEPTH`] when it did not (BEP 10's example
/// default, which old clients enforce).
const MIN_DEPTH: usize = 16;
/// Before the round trip is known.
const START_DEPTH: usize = 64;
const MAX_DEPTH: usize = 2000;
const DEPTH_SLACK: Duration = Duration::from_millis(250);
const NO_REQQ_DEPTH: usize = 250;
// A full pipeline handed to the writer at once, and its cancels, must fit in the outbox.
const _: () = assert!(2 * MAX_DEPTH <= crate::outbox::MAX_PENDING_BLOCKS);
/// Top a pipeline up once this many slots are free, so requests go out in batches.
const REFILL_BATCH: usize = 32;
/// A peer that unchoked us and sent nothing for this long is snubbed (for choking).
const SNUB_AFTER: Duration = Duration::from_secs(60);
/// Requests a peer has not answered for this long are handed to others.
/// How long a piece a peer rejected while unchoking us is not asked of it again.
const REJECT_BACKOFF: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Peers connected this recently count as new for the optimistic unchoke.
const NEW_PEER: Duration = Duration::from_secs(60);

impl Session {
    pub(super) fn peer_mut(&mut self, key: PeerKey) -> &mut Peer {
        self.peers.get_mut(&key).expect("caller checked the key")
    }

    pub(super) fn on_peer_event(&mut self, key: PeerKey, event: PeerEvent) -> Result<(), Error> {
        if !self.peers.contains_key(&key) {
            if let PeerEvent::Block {
                block,
                written: true,
            } = event
            {
                // A dropped connection's last block: free it for another copy.
                self.unwrite(block);
            }
            return Ok(());
        }
        match event {
            PeerEvent::Connected {
                addr,
                peer_id,
                fast,
                commands,
                ..
            } => self.on_connected(key, addr, peer_id, fast, commands),
            PeerEvent::Extended(info) => {
                self.on_pex_offer(key, info.ut_pex);
                let p = self.peer_mut(key);
                p.reqq = info.reqq;
                if let Some(port) = info.listen_port {
                    // Held on the claim's word for now; `distrust_idle_claims` lets go of it
                    // if the claimant proves of no use, so a false claim cannot hide a peer.
                    let listen = std::net::SocketAddr::new(p.addr.ip(), port);
                    self.set_listen_addr(key, listen, false);
                }
            }
            PeerEvent::Bitfield(bits) => {
                self.picker.peer_has_bits(key, &bits);
                self.update_interest(key);
            }
            PeerEvent::Have(piece) => {
                if self.picker.peer_has(key, piece) {
                    self.update_interest(key);
                }
            }
            PeerEvent::HaveAll => {
                self.picker.peer_has_all(key);
                self.update_interest(key);
            }
            PeerEvent::HaveNone => {}
            PeerEvent::Choke => {
                self.peer_mut(key).peer_choking = true;
                // Even under BEP 6 the outstanding requests are handed back: a peer that
                // chokes and then forgets to reject must not strand blocks.
                self.picker.peer_choked(key);
                self.fill(key);
                self.fill_all();
            }
            PeerEvent::Unchoke => {
                let p = self.peer_mut(key);
                p.peer_choking = false;
                p.last_block_at = Instant::now();
                self.fill(key);
            }
            PeerEvent::Rejected(block) => {
                let open = self.picker.request_dropped(key, block);
                let p = self.peer_mut(key);
                if open && !p.peer_choking {
                    // Not the rejects that follow a choke, nor those that acknowledge our
                    // cancels (BEP 6): this peer will not serve the piece now (it may be
                    // damaged on its disk). Others get it meanwhile.
                    p.rejected
                        .insert(block.piece, Instant::now() + REJECT_BACKOFF);
                }
                self.fill_all();
            }
            PeerEvent::AllowedFast(piece) => {
                self.peer_mut(key).allowed_fast.insert(piece);
                self.fill(key);
            }
            PeerEvent::Interested => {
                self.peer_mut(key).peer_interested = true;
                self.unchoke_free_slots();
            }
            PeerEvent::NotInterested => {
                let p = self.peer_mut(key);
                p.peer_interested = false;
                if !p.am_choking {
                    p.am_choking = true;
                    p.unchoked_rounds = 0;
                    p.send(Command::Choke(true));
                    self.unchoke_free_slots();
                }
            }
            PeerEvent::Block { block, written } => self.on_block(key, block, written),
            PeerEvent::Uploaded(n) => {
                let n = u64::from(n);
                self.stats.uploaded.fetch_add(n, Ordering::Relaxed);
                let p = self.peer_mut(key);
                p.up_total += n;
                p.last_payload_at = Instant::now();
                if self.picker.is_complete() {
                    self.uploaded += n;
                }
            }
            PeerEvent::CorruptOnDisk(piece) => {
                if self.corrupt_on_disk.insert(piece) {
                    self.notice(NoticeKind::DiskChanged, format!(
                        "piece {piece} no longer matches its hash on disk (was the file changed?); not serving it"
                    ));
                }
            }
            PeerEvent::Pex { added, dropped } => self.on_pex(added, dropped),
            PeerEvent::DhtPort(port) => {
                if let (Some(dht), Some(p)) = (&self.threads.dht, self.peers.get(&key)) {
                    dht.add_node(p.addr.ip(), port);
                }
            }
            PeerEvent::Gone { error } => self.on_gone(key, error.as_ref()),
        }
        Ok(())
    }

    fn update_interest(&mut self, key: PeerKey) {
        let want = self.picker.is_interesting(key);
        let p = self.peer_mut(key);
        if p.am_interested != want {
            p.am_interested = want;
            p.send(Command::Interested(want));
        }
        if want {
            self.fill(key);
        }
    }

    fn depth(p: &Peer) -> usize {
        if p.snubbed {
            return 1;
        }
        let rate = p.down_rate.max(p.recent_rate) as f64;
        // Until both a round trip and a rate are measured, the starting depth stands.
        let (window, floor) = match p.rtt {
            Some(rtt) if rate > 0.0 => ((rtt + DEPTH_SLACK).min(Duration::from_secs(1)), MIN_DEPTH),
            _ => (Duration::from_secs(1), START_DEPTH),
        };
        let by_rate = (rate * window.as_secs_f64() / f64::from(BLOCK_LEN)) as usize;
        let cap = p
            .reqq
            .map_or(NO_REQQ_DEPTH, |q| q.saturating_sub(2).clamp(1, MAX_DEPTH));
        by_rate.clamp(floor, MAX_DEPTH).min(cap)
    }

    /// Tops up `key`'s request pipeline. While choked, only its allowed-fast pieces (BEP 6).
    /// Not while the hashers are behind: complete pieces wait in resident memory.
    pub(super) fn fill(&mut self, key: PeerKey) {
        if self.picker.pieces_hashing() >= self.max_hashing {
            return;
        }
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        if !p.am_interested || !p.is_connected() || (p.peer_choking && p.allowed_fast.is_empty()) {
            return;
        }
        let depth = Self::depth(p);
        let outstanding = self.picker.outstanding(key);
        let room = depth.saturating_sub(outstanding);
        // A quarter of a shallow pipeline: waiting for all of it to drain would leave the
        // link idle for a round trip each time.
        if room < REFILL_BATCH.min(depth.div_ceil(4)) && outstanding > 0 {
            return;
        }
        // `self.peers` and `self.picker` are borrowed apart, so the filters read the peer's
        // sets in place (no copy per fill).
        let p = self.peers.get(&key).expect("checked above");
        let blocks = if p.peer_choking {
            let allowed = &p.allowed_fast;
            self.picker
                .assign_filtered(key, room, &|piece| allowed.contains(&piece))
        } else if p.rejected.is_empty() {
            self.picker.assign(key, room)
        } else {
            // Expired back-offs are pruned by the tick (`retry_after_backoff`).
            let rejected = &p.rejected;
            self.picker
                .assign_filtered(key, room, &|piece| !rejected.contains_key(&piece))
        };
        if !blocks.is_empty() {
            let p = self.peer_mut(key);
            if outstanding == 0 {
                // The request clock starts now, not at the last block of long ago; so does
                // a round-trip measurement.
                p.last_block_at = Instant::now();
                p.rtt_probe = Some((p.last_block_at, blocks[0]));
            }
            p.send(Command::Request(blocks));
        }
    }

    /// Tops up every peer's pipeline and gives idle web seed connections a run.
    pub(super) fn fill_all(&mut self) {
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.fill(k);
        }
        self.fill_web_all();
    }

    fn on_block(&mut self, key: PeerKey, block: BlockRef, written: bool) {
        let len = u64::from(block.len);
        self.stats.downloaded.fetch_add(len, Ordering::Relaxed);
        self.downloaded += len;
        {
            let p = self.peer_mut(key);
            p.down_total += len;
            p.last_block_at = Instant::now();
            if let Some((sent, first)) = p.rtt_probe
                && first == block
            {
                p.rtt_probe = None;
                let rtt = p.last_block_at - sent;
                p.rtt = Some(p.rtt.map_or(rtt, |r| r.min(rtt)));
            }
            p.last_payload_at = p.last_block_at;
            p.snubbed = false;
        }
        match self.picker.block_received(key, block, written) {
            BlockOutcome::Accepted {
                piece_complete,
                cancel,
            } => {
                for other in cancel {
                    if let Some(p) = self.peers.get(&other) {
                        p.send(Command::Cancel(block));
                    }
                }
                if piece_complete && let Some(tx) = &self.hash_tx {
                    let _ = tx.send(block.piece);
                }
            }
            BlockOutcome::Duplicate => {}
            BlockOutcome::Unrequested => {
                if written {
                    // Written by a connection the picker has already forgotten (banned).
                    self.unwrite(block);
                }
                let p = self.peer_mut(key);
                if p.dropped_by_us {
                    // In flight when we dropped it: not its fault.
                    return;
                }
                p.unrequested += 1;
                if p.unrequested > MAX_UNREQUESTED {
                    self.ban(key, "sends blocks nobody asked for");
                    return;
                }
            }
        }
        self.fill(key);
    }

    /// Frees a block whose bytes were written but that the picker did not take, so another
    /// copy can be written.
    pub(super) fn unwrite(&mut self, block: BlockRef) {
        if let Some(w) = &mut self.writer {
            w.unwrite(block);
        }
    }

    pub(super) fn on_hashed(&mut self, piece: PieceIndex, ok: bool) -> Result<(), Error> {
        let was_paused = self.picker.pieces_hashing() >= self.max_hashing;
        if !ok {
            // Refills every pipeline.
            self.on_bad_piece(piece);
            return Ok(());
        }
        let bored = self.picker.piece_verified(piece);
        if let Some(w) = &mut self.writer {
            w.release_piece(piece);
        }
        let len = u64::from(self.picker.geometry().piece_len(piece));
        self.stats.left.fetch_sub(len, Ordering::Relaxed);
        self.last_progress = Instant::now();
        self.verified_this_run += 1;
        self.count_file_progress(piece);
        self.advance_stream();
        // A seed has every piece: a have would only wake both ends (a write here, a read
        // there, per piece) to say nothing it can use. Its requests for pieces we never
        // announced to it are rejected, as they should be.
        for (key, p) in &self.peers {
            if !self.picker.peer_is_seed(*key) {
                p.send(Command::Have(piece));
            }
        }
        for key in bored {
            if self.peers.contains_key(&key) {
                self.update_interest(key);
            }
        }
        if self.picker.is_complete() && !self.was_complete {
            self.was_complete = true;
            self.on_complete()?;
        }
        if was_paused {
            self.fill_all();
        }
        Ok(())
    }

    /// Counts a verified piece against the files it covers; a file whose last piece this was
    /// is complete.
    fn count_file_progress(&mut self, piece: PieceIndex) {
        let g = self.picker.geometry().clone();
        let files: Vec<usize> = g
            .spans(g.piece_offset(piece), u64::from(g.piece_len(piece)))
            .map(|s| s.file)
            .collect();
        for f in files {
            self.files_left[f] -= 1;
            if self.files_left[f] == 0
                && let Some(Some(path)) = self.paths.get(f)
            {
                let _ = self.events.send(Event::FileCompleted {
                    path: path.clone(),
                    size: g.file_len(f),
                });
            }
        }
    }

    /// A download that starts with files complete (resumed, or a rerun on complete data)
    /// reports them as a fresh download would; when everything is there, it finishes now.
    pub(super) fn report_files_complete_at_start(&mut self) {
        let g = self.picker.geometry().clone();
        for (f, path) in self.paths.iter().enumerate() {
            if let Some(path) = path
                && self.files_left[f] == 0
            {
                let _ = self.events.send(Event::FileCompleted {
                    path: path.clone(),
                    size: g.file_len(f),
                });
            }
        }
        if self.picker.is_complete() {
            self.completed_at = Some(Instant::now());
            if self.cfg.seed_after {
                self.report_finished();
            } else {
                self.finish_pending = true;
            }
        }
    }

    /// A piece failed its hash: its senders lose trust; one that sent all of it, or keeps
    /// failing, is banned.
    fn on_bad_piece(&mut self, piece: PieceIndex) {
        let blocks = self.picker.geometry().blocks_in(piece);
        let senders = self.picker.piece_failed(piece);
        if let Some(w) = &mut self.writer {
            w.reopen(piece);
        }
        self.notice(
            NoticeKind::HashFailed,
            format!("piece {piece} failed its hash check; fetching it again"),
        );
        // Web seeds are blamed per seed (not per connection) and once per piece; whether
        // anyone else's data was in the piece decides how much it weighs.
        let mut sources: Vec<super::webseeds::Source> = senders
            .iter()
            .map(|(key, _)| self.source_of(*key))
            .collect();
        sources.sort_unstable();
        sources.dedup();
        let sole = sources.len() == 1;
        let mut blamed_seeds = Vec::new();
        for (key, count) in senders {
            if self.is_web_seed(key) {
                if let super::webseeds::Source::WebSeed(seed) = self.source_of(key)
                    && !blamed_seeds.contains(&seed)
                {
                    blamed_seeds.push(seed);
                    self.blame_web_seed(seed, sole);
                }
                continue;
            }
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            p.hash_fails += 1;
            if count == blocks {
                self.ban(
                    key,
                    &format!("sent piece {piece}, which failed its hash check"),
                );
            } else if p.hash_fails >= MAX_HASH_FAILS {
                self.ban(
                    key,
                    "took part in too many pieces that failed their hash check",
                );
            }
        }
        self.fill_all();
    }

    fn on_complete(&mut self) -> Result<(), Error> {
        // Web seeds have nothing more to give.
        self.stop_web_seeds();
        if let Some(w) = &mut self.writer {
            w.flush(self.cfg.fsync)?;
        }
        self.seeding_since = Some(Instant::now());
        if let Some(t) = &self.tracker_tx {
            let _ = t.send(TrackerCommand::Completed);
        }
        self.completed_at.get_or_insert_with(Instant::now);
        self.ctx.storage.mark_known_good();
        if self.cfg.seed_after {
            self.report_finished();
        } else {
            // The run ends in a moment: report after the shutdown, so that `finished` is the
            // last event even when the `completed`/`stopped` announces fail.
            self.finish_pending = true;
        }
        Ok(())
    }

    pub(super) fn report_finished(&mut self) {
        self.finish_pending = false;
        let uploaded = self.stats.uploaded.load(Ordering::Relaxed);
        let end = self.completed_at.unwrap_or_else(Instant::now);
        let total = self.picker.geometry().total_len();
        let _ = self.events.send(Event::Finished {
            verified: total - self.stats.left.load(Ordering::Relaxed),
            transferred: self.downloaded,
            web_seed_bytes: self.web.bytes,
            uploaded,
            elapsed: end.duration_since(self.started),
            paths: self.paths.iter().flatten().cloned().collect(),
        });
    }

    /// A peer that holds requests but has sent no block for [`REQUEST_TIMEOUT`] is snubbed:
    /// its requests go back to the picker for others, and it is asked for one block at a time
    /// until it delivers again.
    pub(super) fn release_stalled_requests(&mut self) {
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (key, p) in &self.peers {
            let silent = now.duration_since(p.last_block_at) >= REQUEST_TIMEOUT;
            if !p.snubbed && silent && self.picker.outstanding(*key) > 0 {
                stalled.push(*key);
            }
        }
        for key in &stalled {
            self.peer_mut(*key).snubbed = true;
            for block in self.picker.peer_choked(*key) {
                self.peers[key].send(Command::Cancel(block));
            }
        }
        if !stalled.is_empty() {
            self.fill_all();
        }
    }

    /// Peers whose reject back-off ran out are asked again: nothing else would wake an idle
    /// peer we stopped asking (its only events were the rejects).
    pub(super) fn retry_after_backoff(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerKey> = self
            .peers
            .iter_mut()
            .filter_map(|(k, p)| {
                let before = p.rejected.len();
                p.rejected.retain(|_, until| *until > now);
                (p.rejected.len() < before).then_some(*k)
            })
            .collect();
        for key in due {
            self.fill(key);
        }
    }

    /// Between rechokes, gives free upload slots to interested peers at once, so a newcomer
    /// need not wait up to ten seconds for its first unchoke.
    pub(super) fn unchoke_free_slots(&mut self) {
        let slots = self.cfg.upload_slots + 1;
        let mut open = self.peers.values().filter(|p| !p.am_choking).count();
        for p in self.peers.values_mut() {
            if open >= slots {
                break;
            }
            if p.am_choking && p.peer_interested && p.is_connected() {
                p.am_choking = false;
                p.send(Command::Choke(false));
                open += 1;
            }
        }
    }

    /// The ten-second rechoke: measure rates, ask the choker, apply its answer.
    pub(super) fn rechoke(&mut self) {
        let window = super::RECHOKE_EVERY.as_secs().max(1);
        let now = Instant::now();
        for p in self.peers.values_mut() {
            // Average of this window and the last: a rolling 20 s view.
            let down = (p.down_total - p.down_mark) / window;
            let up = (p.up_total - p.up_mark) / window;
            p.down_rate = (p.down_rate + down) / 2;
            p.up_rate = (p.up_rate + up) / 2;
            p.down_mark = p.down_total;
            p.up_mark = p.up_total;
        }
        let views: Vec<PeerView> = self
            .peers
            .iter()
            .filter(|(_, p)| p.is_connected())
            .map(|(k, p)| PeerView {
                key: *k,
                interested: p.peer_interested,
                download_rate: p.down_rate,
                upload_rate: p.up_rate,
                snubbed: !p.peer_choking
                    && p.am_interested
                    && now.duration_since(p.last_block_at) >= SNUB_AFTER,
                is_new: now.duration_since(p.connected_at) < NEW_PEER,
                unchoked_rounds: if p.am_choking { 0 } else { p.unchoked_rounds },
            })
            .collect();
        let seeding = self.picker.is_complete();
        let unchoke: HashSet<PeerKey> = self.choker.rechoke(&views, seeding);
        for (k, p) in &mut self.peers {
            if !p.is_connected() {
                continue;
            }
            let should_unchoke = unchoke.contains(k);
            if should_unchoke {
                p.unchoked_rounds += 1;
            } else {
                p.unchoked_rounds = 0;
            }
            if should_unchoke == p.am_choking {
                p.am_choking = !should_unchoke;
                p.send(Command::Choke(!should_unchoke));
            }
        }
    }
}
