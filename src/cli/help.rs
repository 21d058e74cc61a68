//! The help screens: `bitfetch --help` and `bitfetch COMMAND --help` (the same as
//! `bitfetch help COMMAND`), drawn from the argh structures of `args.rs` in a layout argh
//! cannot make itself: options under headings, most used first, each with its placeholder
//! (`--peer HOST:PORT`), descriptions wrapped within 80 columns, examples, and what each kind
//! of value accepts. The exit-code table is shown once, in the top-level help.

use argh::{ArgsInfo, CommandInfoWithArgs, FlagInfo, FlagInfoKind, Optionality};

use super::args::Args;
use super::exit;

/// No help line is wider than this.
const WIDTH: usize = 80;
/// Where option descriptions start (as in aria2c's help).
const DESC_COL: usize = 30;
/// Where the descriptions of `Values:` start.
const VALUE_COL: usize = 10;

/// How one command's options are shown.
struct Layout {
    command: &'static str,
    /// Headings and the options under each (by long name), most used first.
    groups: &'static [(&'static str, &'static [&'static str])],
    /// Options the command accepts because it shares them with `download`, but which do
    /// nothing here: left out of its help.
    unlisted: &'static [&'static str],
    /// Where the shared description says something else than is true for this command.
    overrides: &'static [(&'static str, &'static str)],
}

const NETWORK_DOWNLOAD: &[&str] = &[
    "--peer",
    "--port",
    "--bind",
    "--max-download-rate",
    "--max-upload-rate",
    "--max-peers",
    "--max-peers-per-ip",
    "--upload-slots",
];
const NETWORK_SEED: &[&str] = &[
    "--peer",
    "--port",
    "--bind",
    "--max-upload-rate",
    "--max-peers",
    "--max-peers-per-ip",
    "--upload-slots",
];
const TRACKERS: &[&str] = &["--ca-file", "--announce-interval"];
const PEER_SOURCES: &[&str] = &["--no-dht", "--dht-bootstrap", "--no-pex"];
const MESSAGES: &[&str] = &["--quiet", "--json", "--progress-interval"];

const LAYOUTS: &[Layout] = &[
    Layout {
        command: "download",
        groups: &[
            (
                "Output",
                &[
                    "--output",
                    "--output-document",
                    "--stdout",
                    "--file",
                    "--fsync",
                ],
            ),
            ("Files", &["--list", "--select", "--only", "--save-torrent"]),
            (
                "Seeding",
                &["--seed", "--no-seed", "--seed-ratio", "--seed-time"],
            ),
            ("Time limits", &["--timeout", "--stall-timeout"]),
            ("Messages", MESSAGES),
            ("Network", NETWORK_DOWNLOAD),
            ("Trackers", TRACKERS),
            ("DHT and peer exchange", PEER_SOURCES),
            ("Web seeds", &["--web-seed", "--no-web-seeds"]),
        ],
        unlisted: &[],
        overrides: &[],
    },
    Layout {
        command: "seed",
        groups: &[
            (
                "When to stop",
                &["--seed-ratio", "--seed-time", "--timeout"],
            ),
            ("Messages", MESSAGES),
            ("Network", NETWORK_SEED),
            ("Trackers", TRACKERS),
            ("DHT and peer exchange", PEER_SOURCES),
        ],
        unlisted: &[
            "--max-download-rate",
            "--stall-timeout",
            "--web-seed",
            "--no-web-seeds",
        ],
        overrides: &[
            (
                "--seed-ratio",
                "stop once this run has uploaded RATIO times the torrent's size, e.g. 1.5",
            ),
            (
                "--seed-time",
                "stop after seeding this long, e.g. 30m, 2h, 1d",
            ),
            (
                "--timeout",
                "stop after this long in all, checking the data included, e.g. 2h \
                 (exit 7 if the check had not finished)",
            ),
        ],
    },
    Layout {
        command: "info",
        groups: &[("Options", &["--json"])],
        unlisted: &[],
        overrides: &[],
    },
    Layout {
        command: "verify",
        groups: &[("Options", &["--quiet", "--json"])],
        unlisted: &[],
        overrides: &[],
    },
    Layout {
        command: "create",
        groups: &[(
            "Options",
            &[
                "--output",
                "--announce",
                "--force",
                "--piece-length",
                "--private",
                "--comment",
                "--v2",
                "--hybrid",
            ],
        )],
        unlisted: &[],
        overrides: &[],
    },
    Layout {
        command: "scrape",
        groups: &[("Options", &["--json", "--bind", "--ca-file"])],
        unlisted: &[],
        overrides: &[],
    },
    Layout {
        command: "magnet",
        groups: &[],
        unlisted: &[],
        overrides: &[],
    },
];

/// What each placeholder accepts, for the `Values:` section of the helps that use it.
const VALUES: &[(&str, &str)] = &[
    (
        "DURATION",
        "seconds, or with units run together: 90s, 1.5s, 30m, 1h30m, 1d",
    ),
    (
        "SIZE",
        "bytes, or a number with K, M or G (1024-based): 256K, 1.5M, 2G",
    ),
    (
        "RATE",
        "bytes per second, written as a SIZE: 500K, 2M; 0 means no limit",
    ),
];

const TORRENT_NOTE: &str =
    "TORRENT is a .torrent path, - for one on standard input, or an http(s):// URL of one.";
const COMMAND_NOTE: &str =
    "Each command's options: bitfetch COMMAND --help, or bitfetch help COMMAND.";
const SYNTAX_NOTE: &str = "Options may be written --opt VALUE or --opt=VALUE, before or after \
     the arguments; -h is --help.";

/// Every command, as argh knows it.
fn commands() -> Vec<argh::SubCommandInfo> {
    Args::get_args_info().commands
}

/// The argh description of `command`, if it is one.
pub(super) fn command_info(command: &str) -> Option<CommandInfoWithArgs> {
    commands()
        .into_iter()
        .find(|c| c.name == command)
        .map(|c| c.command)
}

/// The names of the commands, most used first.
pub(super) fn command_names() -> Vec<&'static str> {
    commands().iter().map(|c| c.name).collect()
}

/// `bitfetch --help`.
pub(super) fn top() -> String {
    let info = Args::get_args_info();
    let mut out = format!(
        "bitfetch {}: {}\n\n",
        env!("CARGO_PKG_VERSION"),
        lower_first(info.description)
    );
    out += "Usage: bitfetch COMMAND [OPTIONS] ARGUMENTS\n\nCommands:\n";
    let rows: Vec<(String, &str)> = info
        .commands
        .iter()
        .map(|c| {
            (
                format!("{} {}", c.name, positional_usage(&c.command)),
                c.command.description,
            )
        })
        .chain([(
            "version".to_string(),
            "Print the version (also --version, -V).",
        )])
        .collect();
    for (head, text) in &rows {
        out += &entry(head, text, 23);
    }
    out += "\n";
    out += &paragraph(COMMAND_NOTE);
    out += &paragraph(TORRENT_NOTE);
    out += "Values:\n";
    for (name, text) in VALUES {
        out += &entry(name, text, VALUE_COL);
    }
    out += "\n";
    out += &paragraph(SYNTAX_NOTE);
    out += "Examples:\n";
    for e in [
        "bitfetch download ubuntu.torrent -o ~/Downloads",
        "bitfetch download x.torrent --seed-ratio 1.5 --max-upload-rate 2M",
        "bitfetch create ./dir -a http://tracker.example/announce -o dir.torrent",
    ] {
        out += &format!("  {e}\n");
    }
    out += "\n";
    out += exit::TABLE;
    out
}

/// `bitfetch COMMAND --help`, or `None` for no such command.
pub(super) fn command(name: &str) -> Option<String> {
    if name == "version" {
        return Some(
            "Usage: bitfetch version\n\nPrint the version (the same as bitfetch --version)."
                .to_string(),
        );
    }
    let info = command_info(name)?;
    let layout = LAYOUTS.iter().find(|l| l.command == name);
    let mut out = format!("{}\n\n", usage(&info));
    out += &wrap(info.description, 0).join("\n");
    out += "\n\nArguments:\n";
    for p in info.positionals.iter().filter(|p| !p.hidden) {
        out += &entry(p.name, p.description, DESC_COL - 2);
    }
    let groups = groups(&info, layout);
    let single = groups.len() == 1;
    for (title, flags) in &groups {
        out += &format!("\n{title}:\n");
        for f in flags {
            let text = layout
                .and_then(|l| l.overrides.iter().find(|(long, _)| *long == f.long))
                .map_or(f.description, |(_, text)| *text);
            out += &entry(&flag_head(f), text, DESC_COL - 2);
        }
    }
    // With one group, help is one more option in it; after several, it stands alone.
    if !single {
        out += "\n";
    }
    out += &entry("-h, --help", "show this help and exit", DESC_COL - 2);
    let used: Vec<&str> = listed_flags(&info, layout)
        .filter_map(|f| match f.kind {
            FlagInfoKind::Option { arg_name } => Some(arg_name),
            FlagInfoKind::Switch => None,
        })
        .collect();
    let values: Vec<&(&str, &str)> = VALUES
        .iter()
        .filter(|(name, _)| used.contains(name))
        .collect();
    if !values.is_empty() {
        out += "\nValues:\n";
        for (name, text) in values {
            out += &entry(name, text, VALUE_COL);
        }
    }
    if !info.examples.is_empty() {
        out += "\nExamples:\n";
        for e in info.examples {
            out += &format!("  {e}\n");
        }
    }
    out += "\nExit codes: see bitfetch --help.";
    Some(out)
}

/// `Usage: bitfetch download [OPTIONS] TORRENT`.
pub(super) fn usage(info: &CommandInfoWithArgs) -> String {
    format!(
        "Usage: bitfetch {} [OPTIONS] {}",
        info.name,
        positional_usage(info)
    )
}

/// `TORRENT [DATA]`.
fn positional_usage(info: &CommandInfoWithArgs) -> String {
    info.positionals
        .iter()
        .filter(|p| !p.hidden)
        .map(|p| match p.optionality {
            Optionality::Required => p.name.to_string(),
            Optionality::Optional => format!("[{}]", p.name),
            Optionality::Repeating | Optionality::Greedy => format!("[{}...]", p.name),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The option groups of a command's help, in order; options its layout does not place
/// (one added without updating `LAYOUTS`) come last, under `Other options`.
fn groups<'a>(
    info: &'a CommandInfoWithArgs,
    layout: Option<&Layout>,
) -> Vec<(&'static str, Vec<&'a FlagInfo<'static>>)> {
    let find = |long: &str| info.flags.iter().find(|f| f.long == long);
    let mut out: Vec<(&'static str, Vec<&FlagInfo>)> = layout
        .map(|l| {
            l.groups
                .iter()
                .map(|(title, names)| (*title, names.iter().filter_map(|n| find(n)).collect()))
                .collect()
        })
        .unwrap_or_default();
    let placed = |f: &FlagInfo| {
        f.long == "--help"
            || f.hidden
            || layout.is_some_and(|l| {
                l.unlisted.contains(&f.long) || l.groups.iter().any(|(_, g)| g.contains(&f.long))
            })
    };
    let other: Vec<&FlagInfo> = info.flags.iter().filter(|f| !placed(f)).collect();
    if !other.is_empty() {
        out.push(("Other options", other));
    }
    out.retain(|(_, flags)| !flags.is_empty());
    out
}

/// Every option a command's help lists (`--help` aside).
fn listed_flags<'a>(
    info: &'a CommandInfoWithArgs,
    layout: Option<&Layout>,
) -> impl Iterator<Item = &'a FlagInfo<'static>> {
    groups(info, layout).into_iter().flat_map(|(_, f)| f)
}

/// `-o, --output DIR` or `    --peer HOST:PORT`.
fn flag_head(f: &FlagInfo) -> String {
    let short = f.short.map_or("    ".to_string(), |c| format!("-{c}, "));
    match f.kind {
        FlagInfoKind::Option { arg_name } => format!("{short}{} {arg_name}", f.long),
        FlagInfoKind::Switch => format!("{short}{}", f.long),
    }
}

/// `  HEAD   text wrapped in its column`, the text starting `col` columns after the indent
/// (on the next line when the head is too wide).
fn entry(head: &str, text: &str, col: usize) -> String {
    let indent = " ".repeat(col + 2);
    let mut out = format!("  {head}");
    let lines = wrap(text, col + 2);
    if head.chars().count() + 2 > col {
        out += "\n";
        out += &indent;
    } else {
        out += &" ".repeat(col - head.chars().count());
    }
    out += &lines.join(&format!("\n{indent}"));
    out + "\n"
}

/// `text` cut at spaces into lines that fit `WIDTH` after `indent` columns.
fn wrap(text: &str, indent: usize) -> Vec<String> {
    let width = WIDTH.saturating_sub(indent).max(20);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

/// `text` wrapped, then a blank line.
fn paragraph(text: &str) -> String {
    wrap(text, 0).join("\n") + "\n\n"
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_lowercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_of_every_command_has_its_place() {
        for name in command_names() {
            let info = command_info(name).unwrap();
            let layout = LAYOUTS.iter().find(|l| l.command == name);
            let layout = layout.unwrap_or_else(|| panic!("no layout for {name}"));
            let groups = groups(&info, Some(layout));
            assert!(
                groups.iter().all(|(title, _)| *title != "Other options"),
                "{name}: an option no group of LAYOUTS lists: {:?}",
                groups.last()
            );
            for (_, names) in layout.groups {
                for n in *names {
                    assert!(
                        info.flags.iter().any(|f| f.long == *n),
                        "{name}: LAYOUTS lists {n}, which the command does not have"
                    );
                }
            }
            for n in layout
                .overrides
                .iter()
                .map(|(n, _)| n)
                .chain(layout.unlisted)
            {
                assert!(info.flags.iter().any(|f| f.long == *n), "{name}: {n}");
            }
        }
    }

    #[test]
    fn repeatable_options_say_so() {
        for name in command_names() {
            for f in command_info(name).unwrap().flags {
                if f.optionality == Optionality::Repeating {
                    assert!(
                        f.description.contains("repeat"),
                        "{name} {}: repeatable, but its help does not say so",
                        f.long
                    );
                }
            }
        }
    }

    #[test]
    fn wrapping_keeps_every_word_and_the_column() {
        let text = "one two three four five six seven eight nine ten eleven twelve";
        let lines = wrap(text, 60);
        assert!(lines.len() > 1 && lines.iter().all(|l| l.len() <= 20));
        assert_eq!(lines.join(" "), text);
        let e = entry("--a-very-long-option-name VALUE", "text", 10);
        assert_eq!(e, "  --a-very-long-option-name VALUE\n            text\n");
        assert_eq!(entry("-q", "quiet", 6), "  -q    quiet\n");
    }
}
