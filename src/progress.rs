//! The one owner of the terminal: a progress bar on stderr when it is a terminal, a summary
//! line at the end otherwise. Only the session thread calls it.

use std::io::{IsTerminal, Stderr};
use std::time::{Duration, Instant};

use pbr::{ProgressBar, Units};

use crate::cli::human_bytes;

pub struct Progress {
    bar: Option<ProgressBar<Stderr>>,
    quiet: bool,
    started: Instant,
    last_draw: Instant,
}

impl Progress {
    pub fn new(total: u64, done: u64, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let mut pb = ProgressBar::on(std::io::stderr(), total);
            pb.set_units(Units::Bytes);
            pb.set_max_refresh_rate(Some(Duration::from_millis(200)));
            pb.show_speed = true;
            pb.show_time_left = true;
            pb.set(done);
            pb
        });
        Progress {
            bar,
            quiet,
            started: Instant::now(),
            last_draw: Instant::now(),
        }
    }

    pub fn update(&mut self, done: u64, peers: usize, seeds: usize) {
        if self.last_draw.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last_draw = Instant::now();
        if let Some(pb) = &mut self.bar {
            pb.message(&format!("{peers} peers ({seeds} seeds) "));
            pb.set(done);
        }
    }

    /// A line for people (tracker trouble, notable events), kept clear of the bar.
    pub fn note(&mut self, msg: &str) {
        if self.quiet {
            return;
        }
        if self.bar.is_some() {
            eprint!("\r\x1b[2K");
        }
        eprintln!("bitfetch: {msg}");
    }

    pub fn finish(&mut self, downloaded: u64) {
        if let Some(mut pb) = self.bar.take() {
            pb.finish_print("");
        }
        if self.quiet {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            downloaded as f64 / secs
        } else {
            0.0
        };
        eprintln!(
            "bitfetch: downloaded {} in {secs:.1} s ({}/s)",
            human_bytes(downloaded),
            human_bytes(rate as u64)
        );
    }
}
