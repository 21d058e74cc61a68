//! The session's side of web seeds (see `crate::webseed`): starting each seed's connections,
//! handing them runs, taking their blocks, and each seed's standing (`Health`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::Session;
use crate::engine::Event;
use crate::geometry::{BLOCK_LEN, PieceIndex};
use crate::metainfo::Metainfo;
use crate::picker::{BlockOutcome, PeerKey};
use crate::webseed::health::Health;
use crate::webseed::response::Fault;
use crate::webseed::{self, Seed, WebCommand, WebEvent};

/// A sender of blocks, for blame: web seed connections count as their seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Source {
    Peer(PeerKey),
    WebSeed(usize),
}

/// Every web seed of the run and its connections.
#[derive(Default)]
pub(super) struct WebSeeds {
    seeds: Vec<SeedEntry>,
    conns: HashMap<PeerKey, WebConn>,
    /// Payload bytes received from web seeds in this run.
    pub bytes: u64,
}

struct SeedEntry {
    shared: Arc<Seed>,
    health: Health,
    /// Given up: its connections are ending.
    dropped: bool,
    /// Kinds of failure already reported for this seed: each is news once, however often a
    /// server that delivers a little and then fails again repeats it.
    reported: Vec<std::mem::Discriminant<Fault>>,
    /// Per piece, whether this seed can serve it (all its files present); `None`: all.
    servable: Option<Vec<bool>>,
}

struct WebConn {
    seed: usize,
    /// Dropped to tell the connection to end.
    commands: Option<Sender<WebCommand>>,
    thread: Option<JoinHandle<()>>,
    /// Working on an assignment.
    busy: bool,
}

impl WebSeeds {
    /// Web seeds in use now (not given up).
    pub(super) fn live(&self) -> usize {
        self.seeds.iter().filter(|s| !s.dropped).count()
    }

    /// Whether any web seed was named at all.
    pub(super) fn any(&self) -> bool {
        !self.seeds.is_empty()
    }

    /// Connections whose threads have not ended yet.
    pub(super) fn connections(&self) -> usize {
        self.conns.len()
    }

    fn working(&self) -> usize {
        self.conns.values().filter(|c| c.busy).count()
    }
}

impl Session {
    /// Starts the connections of every usable web seed: the torrent's `url-list`, then those
    /// of the link and the user (`Config::web_seeds`), unless web seeds are off.
    pub(super) fn start_web_seeds(&mut self, meta: &Metainfo) {
        if !self.cfg.use_web_seeds || self.writer.is_none() || self.picker.is_complete() {
            return;
        }
        let urls = webseed::choose(&[&meta.url_list, &self.cfg.web_seeds]);
        let pad: Vec<bool> = meta.files.iter().map(|f| f.pad).collect();
        for url in urls {
            let agent = match crate::http::web_seed_agent(
                webseed::worker::READ_TIMEOUT,
                self.cfg.bind,
                self.cfg.ca_file.as_deref(),
            ) {
                Ok(a) => a,
                Err(e) => {
                    self.web_seed_error(&url, e.to_string());
                    continue;
                }
            };
            let shared = Arc::new(Seed {
                file_urls: webseed::url::file_urls(&url, meta),
                url,
                agent,
                pad: pad.clone(),
                stop: Default::default(),
                ignores_range_told: Default::default(),
            });
            let index = self.web.seeds.len();
            self.web.seeds.push(SeedEntry {
                shared: Arc::clone(&shared),
                health: Health::new(meta.files.len()),
                dropped: false,
                reported: Vec::new(),
                servable: None,
            });
            for _ in 0..webseed::CONNECTIONS {
                let key = PeerKey(self.next_key);
                self.next_key += 1;
                let (tx, rx) = crossbeam_channel::bounded(1);
                let thread = webseed::worker::spawn(
                    key,
                    Arc::clone(&shared),
                    Arc::clone(&self.ctx),
                    rx,
                    self.input_tx.clone(),
                );
                let Ok(thread) = thread else {
                    break;
                };
                self.picker.add_peer(key);
                self.picker.peer_has_all(key);
                self.web.conns.insert(
                    key,
                    WebConn {
                        seed: index,
                        commands: Some(tx),
                        thread: Some(thread),
                        busy: false,
                    },
                );
            }
        }
        self.fill_web_all();
    }

    pub(super) fn is_web_seed(&self, key: PeerKey) -> bool {
        self.web.conns.contains_key(&key)
    }

    pub(super) fn on_web_event(&mut self, key: PeerKey, event: WebEvent) {
        match event {
            WebEvent::Block { block, written } => self.on_web_block(key, block, written),
            WebEvent::Done => {
                if let Some(c) = self.web.conns.get_mut(&key) {
                    c.busy = false;
                }
                // Blocks left unread because others wrote them.
                self.picker.peer_choked(key);
                self.fill_web(key);
            }
            WebEvent::Failed(fault) => self.on_web_fault(key, fault),
            WebEvent::Notice(message) => {
                if let Some(c) = self.web.conns.get(&key) {
                    let url = self.web.seeds[c.seed].shared.url.clone();
                    self.web_seed_error(&url, message);
                }
            }
            WebEvent::Gone => {
                if let Some(mut c) = self.web.conns.remove(&key) {
                    self.picker.remove_peer(key);
                    if let Some(t) = c.thread.take() {
                        let _ = t.join();
                    }
                    self.fill_all();
                }
            }
        }
    }

    fn on_web_block(&mut self, key: PeerKey, block: crate::geometry::BlockRef, written: bool) {
        let len = u64::from(block.len);
        self.stats.downloaded.fetch_add(len, Ordering::Relaxed);
        self.downloaded += len;
        self.web.bytes += len;
        let Some(seed) = self.web.conns.get(&key).map(|c| c.seed) else {
            if written {
                self.unwrite(block);
            }
            return;
        };
        let entry = &mut self.web.seeds[seed];
        entry.health.delivered();
        match self.picker.block_received(key, block, written) {
            BlockOutcome::Accepted {
                piece_complete,
                cancel,
            } => {
                for other in cancel {
                    if let Some(p) = self.peers.get(&other) {
                        p.send(crate::messages::Command::Cancel(block));
                    }
                }
                if piece_complete && let Some(tx) = &self.hash_tx {
                    let _ = tx.send(block.piece);
                }
            }
            BlockOutcome::Duplicate => {}
            BlockOutcome::Unrequested => {
                if written {
                    self.unwrite(block);
                }
            }
        }
    }

    fn on_web_fault(&mut self, key: PeerKey, fault: Fault) {
        let Some(c) = self.web.conns.get_mut(&key) else {
            return;
        };
        c.busy = false;
        let seed = c.seed;
        // What it was asked for and did not deliver goes back to the pool.
        self.picker.peer_choked(key);
        let wanted = self.files_wanted();
        let entry = &mut self.web.seeds[seed];
        if entry.dropped {
            return;
        }
        // Several connections may hit the same missing file: it is news once.
        let news = match fault {
            Fault::FileMissing { file, .. } => entry.health.has_file(file),
            _ => true,
        };
        let verdict = entry.health.fault(Instant::now(), &fault, &wanted);
        let url = entry.shared.url.clone();
        if let Some(why) = verdict {
            self.drop_web_seed(seed, why);
        } else if let Fault::FileMissing { file, .. } = fault {
            if !news {
                return self.fill_all();
            }
            let name = self.ctx.meta.files[file].path.display().to_string();
            self.web_seed_error(&url, format!("{fault}: {name}; other files still used"));
            self.update_servable(seed);
        } else if !entry.reported.contains(&std::mem::discriminant(&fault)) {
            entry.reported.push(std::mem::discriminant(&fault));
            self.web_seed_error(&url, format!("{fault}; will retry"));
        }
        self.fill_all();
    }

    /// Per file: whether it still holds bytes we want (and is not a pad file).
    fn files_wanted(&self) -> Vec<bool> {
        let g = self.picker.geometry();
        let have = self.picker.have_flags();
        (0..g.file_count())
            .map(|f| {
                !self.ctx.meta.files[f].pad
                    && g.file_len(f) > 0
                    && g.pieces_of_file(f).any(|p| !have[p as usize])
            })
            .collect()
    }

    fn update_servable(&mut self, seed: usize) {
        let g = self.picker.geometry();
        let entry = &mut self.web.seeds[seed];
        let servable = g
            .pieces()
            .map(|p| {
                g.spans(g.piece_offset(p), u64::from(g.piece_len(p)))
                    .all(|s| entry.shared.pad[s.file] || entry.health.has_file(s.file))
            })
            .collect();
        entry.servable = Some(servable);
    }

    /// Gives a seed up: its connections end, what they were asked for goes to others.
    fn drop_web_seed(&mut self, seed: usize, why: String) {
        let entry = &mut self.web.seeds[seed];
        if entry.dropped {
            return;
        }
        entry.dropped = true;
        entry.shared.stop.store(true, Ordering::Relaxed);
        let url = entry.shared.url.clone();
        for (key, c) in self.web.conns.iter_mut().filter(|(_, c)| c.seed == seed) {
            c.commands = None;
            c.busy = false;
            self.picker.peer_choked(*key);
        }
        self.web_seed_error(&url, format!("{why}; not used any more"));
        self.fill_all();
    }

    /// Who a sender of blocks is: a peer connection, or web seed `n` (whatever connection of
    /// it sent them).
    pub(super) fn source_of(&self, key: PeerKey) -> Source {
        match self.web.conns.get(&key) {
            Some(c) => Source::WebSeed(c.seed),
            None => Source::Peer(key),
        }
    }

    /// A piece with data from web seed `seed` failed its hash (`sole`: only its data).
    pub(super) fn blame_web_seed(&mut self, seed: usize, sole: bool) {
        if self.web.seeds[seed].dropped {
            return;
        }
        if let Some(why) = self.web.seeds[seed].health.hash_failed(sole) {
            self.drop_web_seed(seed, why);
        }
    }

    /// Gives an idle connection its next run, unless its seed is backing off or the hashers
    /// are behind.
    pub(super) fn fill_web(&mut self, key: PeerKey) {
        if self.picker.pieces_hashing() >= self.max_hashing || self.picker.is_complete() {
            return;
        }
        let Some(c) = self.web.conns.get(&key) else {
            return;
        };
        let entry = &self.web.seeds[c.seed];
        if c.busy || c.commands.is_none() || entry.dropped || !entry.health.ready(Instant::now()) {
            return;
        }
        let left = self.stats.left.load(Ordering::Relaxed);
        let g = self.picker.geometry();
        let run = webseed::run_len(left, self.web.working() + 1, g.nominal_piece_len());
        let max = run.div_ceil(u64::from(BLOCK_LEN)) as usize;
        let blocks = match &entry.servable {
            None => self.picker.assign_run(key, max, &|_| true),
            Some(ok) => self
                .picker
                .assign_run(key, max, &|p: PieceIndex| ok[p.usize()]),
        };
        if blocks.is_empty() {
            return;
        }
        let c = self.web.conns.get_mut(&key).expect("checked above");
        let sent = c
            .commands
            .as_ref()
            .is_some_and(|tx| tx.try_send(WebCommand::Fetch(blocks)).is_ok());
        if sent {
            c.busy = true;
        } else {
            self.picker.peer_choked(key);
        }
    }

    pub(super) fn fill_web_all(&mut self) {
        let keys: Vec<PeerKey> = self.web.conns.keys().copied().collect();
        for key in keys {
            self.fill_web(key);
        }
    }

    /// The download is complete or the run ends: every connection is told to end.
    pub(super) fn stop_web_seeds(&mut self) {
        for s in &self.web.seeds {
            s.shared.stop.store(true, Ordering::Relaxed);
        }
        for c in self.web.conns.values_mut() {
            c.commands = None;
        }
    }

    /// A connection that ended while the session shuts down.
    pub(super) fn web_gone(&mut self, key: PeerKey) {
        if let Some(mut c) = self.web.conns.remove(&key)
            && let Some(t) = c.thread.take()
        {
            let _ = t.join();
        }
    }

    fn web_seed_error(&self, url: &str, message: String) {
        let _ = self.events.send(Event::WebSeedError {
            url: url.to_string(),
            message,
        });
    }
}
