//! Mistakes on the command line, said in our style: `bitfetch: error: ...` on one line,
//! with a suggestion when a command or option is close to one that exists, then the usage
//! of the command concerned. argh finds the mistakes; this module rewords what it says.

use argh::{CommandInfoWithArgs, FlagInfoKind};

use super::help;

/// argh's complaint about the command line `args` (normalised), in our style.
pub(super) fn argh_error(argh_says: &str, args: &[&str]) -> String {
    let first = args.first().copied();
    // After `--` even `--help` is an argument, not an option.
    let positional = args.iter().skip_while(|a| **a != "--").skip(1);
    let positional: Vec<&str> = positional.copied().collect();
    let info = first.and_then(help::command_info);
    if let Some(typed) = first.filter(|c| !c.starts_with('-'))
        && info.is_none()
    {
        return unknown_command(typed);
    }
    let what = reword(argh_says.trim_end(), info.as_ref(), &positional);
    match info {
        Some(info) => format!(
            "bitfetch: error: {what}\n{}\nRun 'bitfetch {} --help' for its options.",
            help::usage(&info),
            info.name
        ),
        None => format!("bitfetch: error: {what}\nRun 'bitfetch --help' for usage."),
    }
}

/// `bitfetch downlod`, `bitfetch help downlod`.
pub(super) fn unknown_command(typed: &str) -> String {
    let what = match suggest(typed, &commands(), 2) {
        Some(s) => format!("unknown command '{typed}'; did you mean '{s}'?"),
        None => format!(
            "unknown command '{typed}' (commands: {})",
            commands().join(", ")
        ),
    };
    format!("bitfetch: error: {what}\nRun 'bitfetch --help' for usage.")
}

fn commands() -> Vec<&'static str> {
    let mut all = help::command_names();
    all.push("version");
    all
}

/// What argh said, in our words.
fn reword(said: &str, info: Option<&CommandInfoWithArgs>, positional: &[&str]) -> String {
    if let Some(arg) = said.strip_prefix("Unrecognized argument: ") {
        return if arg.starts_with('-') && arg.len() > 1 && !positional.contains(&arg) {
            unknown_option(arg, info)
        } else {
            format!("unexpected argument '{arg}'")
        };
    }
    if let Some(opt) = said
        .strip_prefix("No value provided for option '")
        .and_then(|s| s.strip_suffix("'."))
    {
        return match placeholder(info, opt) {
            Some(value) => format!("{opt} needs a value: {opt} {value}"),
            None => format!("{opt} needs a value"),
        };
    }
    if let Some((opt, rest)) = said
        .strip_prefix("Error parsing option '")
        .and_then(|s| s.split_once("' with value '"))
        && let Some((value, why)) = rest.rsplit_once("': ")
    {
        let expected = match placeholder(info, opt) {
            Some("N") => "a whole number".to_string(),
            Some("PORT") => "a port number from 0 to 65535".to_string(),
            Some("IP") => "an IP address, e.g. 127.0.0.1 or ::1".to_string(),
            _ => why.to_string(),
        };
        return format!("{opt} {value}: expected {expected}");
    }
    if let Some(names) = said.strip_prefix("Required positional arguments not provided:") {
        let names: Vec<&str> = names.split_whitespace().collect();
        return format!("missing {}", names.join(" and "));
    }
    if said.starts_with("One of the following subcommands must be present") {
        return format!("no command given (commands: {})", commands().join(", "));
    }
    let mut chars = said.chars();
    chars
        .next()
        .map(|c| c.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

/// `unknown option '--max-peer'; did you mean '--max-peers'?`, or which commands take it.
fn unknown_option(arg: &str, info: Option<&CommandInfoWithArgs>) -> String {
    let own: Vec<&str> = info.map_or_else(
        || vec!["--help", "--version"],
        |i| i.flags.iter().map(|f| f.long).collect(),
    );
    // `-peer` for `--peer`, `--maxpeers` for `--max-peers`: compared without dashes.
    let bare = |s: &str| s.trim_start_matches('-').replace('-', "");
    let typed = bare(arg);
    if typed.len() >= 3
        && let Some(s) = own
            .iter()
            .map(|o| (edit_distance(&typed, &bare(o)), *o))
            .filter(|(d, _)| *d <= 2)
            .min()
            .map(|(_, o)| o)
    {
        return format!("unknown option '{arg}'; did you mean '{s}'?");
    }
    let Some(info) = info else {
        return format!("unknown option '{arg}'");
    };
    let elsewhere: Vec<&str> = help::command_names()
        .into_iter()
        .filter(|c| {
            help::command_info(c).is_some_and(|i| {
                i.flags
                    .iter()
                    .any(|f| f.long == arg || f.short.is_some_and(|s| arg == format!("-{s}")))
            })
        })
        .collect();
    match elsewhere[..] {
        [] => format!("unknown option '{arg}'"),
        [one] => format!("{} has no option '{arg}' ({one} has)", info.name),
        [ref some @ .., last] => format!(
            "{} has no option '{arg}' ({} and {last} have)",
            info.name,
            some.join(", ")
        ),
    }
}

/// The placeholder of option `opt` (`--port` → `PORT`), if it takes a value.
fn placeholder(info: Option<&CommandInfoWithArgs>, opt: &str) -> Option<&'static str> {
    let flag = info?
        .flags
        .iter()
        .find(|f| f.long == opt || f.short.is_some_and(|s| opt == format!("-{s}")))?;
    match flag.kind {
        FlagInfoKind::Option { arg_name } => Some(arg_name),
        FlagInfoKind::Switch => None,
    }
}

/// The candidate closest to `typed`, when one is within `max` edits.
fn suggest<'a>(typed: &str, candidates: &[&'a str], max: usize) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(typed, c), *c))
        .filter(|(d, _)| *d <= max)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_commands_get_a_suggestion() {
        let all = commands();
        assert_eq!(suggest("downlod", &all, 2), Some("download"));
        assert_eq!(suggest("sed", &all, 2), Some("seed"));
        assert_eq!(suggest("verfy", &all, 2), Some("verify"));
        assert_eq!(suggest("xyzzy", &all, 2), None);
    }

    #[test]
    fn argh_complaints_are_reworded_with_the_usage_of_the_command() {
        let e = argh_error(
            "Unrecognized argument: --max-peer\n",
            &["download", "x", "--max-peer", "3"],
        );
        assert_eq!(
            e,
            "bitfetch: error: unknown option '--max-peer'; did you mean '--max-peers'?\n\
             Usage: bitfetch download [OPTIONS] TORRENT\n\
             Run 'bitfetch download --help' for its options."
        );
        let first =
            |said: &str, a: &[&str]| argh_error(said, a).lines().next().unwrap().to_string();
        assert_eq!(
            first("Unrecognized argument: -peer\n", &["seed", "-peer"]),
            "bitfetch: error: unknown option '-peer'; did you mean '--peer'?"
        );
        assert_eq!(
            first("Unrecognized argument: --peer\n", &["info", "--peer"]),
            "bitfetch: error: info has no option '--peer' (download and seed have)"
        );
        assert_eq!(
            first("Unrecognized argument: y\n", &["info", "x", "y"]),
            "bitfetch: error: unexpected argument 'y'"
        );
        assert_eq!(
            first(
                "No value provided for option '--peer'.\n",
                &["download", "--peer"]
            ),
            "bitfetch: error: --peer needs a value: --peer HOST:PORT"
        );
        assert_eq!(
            first(
                "Error parsing option '--port' with value '99999': number too large to fit in target type\n",
                &["seed", "--port", "99999"]
            ),
            "bitfetch: error: --port 99999: expected a port number from 0 to 65535"
        );
        assert_eq!(
            first(
                "Required positional arguments not provided:\n    DATA\n",
                &["seed", "x"]
            ),
            "bitfetch: error: missing DATA"
        );
        assert!(
            first(
                "One of the following subcommands must be present:\n    help\n",
                &[]
            )
            .starts_with("bitfetch: error: no command given (commands: download, seed,")
        );
        assert_eq!(
            first(
                "Unrecognized argument: --help\n",
                &["info", "x", "--", "--help"]
            ),
            "bitfetch: error: unexpected argument '--help'"
        );
        assert_eq!(
            first("Unrecognized argument: --nope\n", &["--nope"]),
            "bitfetch: error: unknown option '--nope'"
        );
    }
}
