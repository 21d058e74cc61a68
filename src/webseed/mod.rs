//! Web seeds (BEP 19): HTTP(S) servers that hold the torrent's files.
//!
//! Each web seed is a source of its own kind, not a TCP peer: up to
//! [`CONNECTIONS`] connection threads (`worker.rs`), sharing one keep-alive `ureq` agent,
//! each registered with the session and its picker like a peer that has every piece and never
//! chokes. The session hands a connection a long run of pieces at a time
//! (`Picker::assign_run`); the connection asks for it with one `Range` request per file the
//! run touches (`plan.rs`; the URL of each file by `url.rs`), checks each answer
//! (`response.rs`) and reads the body straight into the file maps under the blocks' claims,
//! reporting each block as a peer's reader does. The hashers, the endgame and the blame for a
//! failed piece are the peers'. What the session keeps per seed — back-off, files the server
//! lacks, hash failures, when to give it up — is the pure `Health` (`health.rs`).

pub mod health;
pub mod plan;
pub mod response;
pub mod url;
pub mod worker;

pub use worker::{Seed, WebCommand, WebEvent};

/// Connections per web seed.
pub const CONNECTIONS: usize = 4;
/// Most web seeds used at once (a torrent or a link could name thousands).
pub const MAX_SEEDS: usize = 16;
/// The longest run given to one connection at a time.
pub const MAX_RUN: u64 = 16 * 1024 * 1024;

/// The web seeds to use, in order: the torrent's, then the link's, then the user's; only
/// usable http(s) URLs, each once, at most [`MAX_SEEDS`].
pub fn choose(lists: &[&[String]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in lists.iter().flat_map(|l| l.iter()) {
        if out.len() >= MAX_SEEDS {
            break;
        }
        if url::usable(url) && !out.contains(url) {
            out.push(url.clone());
        }
    }
    out
}

/// The run a connection is given, in bytes: long for throughput, but shared out near the end
/// so that every connection has some of what is left. `left`: bytes not yet started,
/// `connections`: web seed connections at work.
pub fn run_len(left: u64, connections: usize, piece_len: u32) -> u64 {
    let share = left / (2 * connections.max(1) as u64);
    share.clamp(u64::from(piece_len), MAX_RUN.max(u64::from(piece_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_chosen_once_each_and_only_http() {
        let torrent = vec!["http://127.0.0.1:1/a".to_string(), "ftp://x/".to_string()];
        let user = vec![
            "http://127.0.0.1:1/a".to_string(),
            "https://127.0.0.1:2/b/".to_string(),
        ];
        assert_eq!(
            choose(&[&torrent, &[], &user]),
            vec!["http://127.0.0.1:1/a", "https://127.0.0.1:2/b/"]
        );
        let many: Vec<String> = (0..100).map(|i| format!("http://127.0.0.1/{i}")).collect();
        assert_eq!(choose(&[&many]).len(), MAX_SEEDS);
    }

    #[test]
    fn runs_are_long_but_shared_near_the_end() {
        let mib = 1024 * 1024;
        assert_eq!(run_len(1024 * mib, 4, 256 * 1024), MAX_RUN);
        assert_eq!(run_len(16 * mib, 4, 256 * 1024), 2 * mib);
        assert_eq!(run_len(100, 4, 256 * 1024), 256 * 1024);
        assert_eq!(run_len(0, 0, 32 * mib as u32), 32 * mib);
    }
}
