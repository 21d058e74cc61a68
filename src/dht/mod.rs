//! STUB for integration; replaced by the real DHT from branch `dht`.
#![allow(dead_code)]
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub(crate) struct Config {
    pub bind: Option<IpAddr>,
    pub port: u16,
    pub bootstrap: Vec<String>,
    pub state_file: Option<PathBuf>,
}
pub(crate) enum Event {
    Peers {
        info_hash: [u8; 20],
        peers: Vec<SocketAddr>,
    },
    Ready {
        nodes: usize,
    },
    LookupDone {
        info_hash: [u8; 20],
        peers: usize,
    },
    Notice(String),
}
pub(crate) struct Dht {
    local: SocketAddr,
}
impl Dht {
    pub fn start(cfg: Config, sink: Box<dyn FnMut(Event) -> bool + Send>) -> std::io::Result<Dht> {
        let _ = (cfg, sink);
        Err(std::io::Error::other("stub"))
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
    pub fn get_peers(&self, info_hash: [u8; 20], announce_port: Option<u16>) {
        let _ = (info_hash, announce_port);
    }
    pub fn add_node(&self, addr: SocketAddr) {
        let _ = addr;
    }
    pub fn stop(self, budget: Duration) {
        let _ = budget;
    }
}
