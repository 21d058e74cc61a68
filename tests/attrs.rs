//! BEP 47 file attributes end to end: `x` makes a downloaded file executable, `l` makes a
//! symbolic link, but only to a path of the torrent's own tree that passes through no other
//! link; every other link is skipped with a notice, reported nowhere as a file, and nothing is
//! ever created outside the output directory (a link planted in it is not followed either).

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha1::{Digest, Sha1};
use support::Diagnose;
use support::bencode::B;
use support::cli::*;
use support::files::scratch_dir;
use support::net::next_loopback;

/// A multi-file torrent `t`: `a` (5 bytes, `x`), `b` (3 bytes), then the link entries given as
/// (path, target) pairs, each `attr l`, length 0.
fn torrent_with_links(links: &[(&[&str], &[&str])]) -> Vec<u8> {
    let data = b"helloabc";
    let mut files = vec![
        B::dict([
            ("attr", B::str("x")),
            ("length", B::Int(5)),
            ("path", B::List(vec![B::str("a")])),
        ]),
        B::dict([("length", B::Int(3)), ("path", B::List(vec![B::str("b")]))]),
    ];
    for (path, target) in links {
        files.push(B::dict([
            ("attr", B::str("l")),
            ("length", B::Int(0)),
            ("path", B::List(path.iter().map(B::str).collect())),
            ("symlink path", B::List(target.iter().map(B::str).collect())),
        ]));
    }
    let info = B::dict([
        ("files", B::List(files)),
        ("name", B::str("t")),
        ("piece length", B::Int(16384)),
        ("pieces", B::bytes(Sha1::digest(data))),
    ]);
    B::dict([("info", info)]).encode()
}

#[test]
fn executable_bits_and_links_inside_the_tree_only() {
    let dir = scratch_dir();
    let links: [(&[&str], &[&str]); 6] = [
        // Good: a link to a file, from a subdirectory.
        (&["dir", "link"], &["a"]),
        // Good: a link to a directory of the torrent.
        (&["up"], &["dir"]),
        // Bad: climbs out of the torrent.
        (&["evil"], &["..", "..", "etc", "passwd"]),
        // Bad: through another link (`up` is one).
        (&["chain"], &["up", "link"]),
        // Bad: to another link.
        (&["to_link"], &["dir", "link"]),
        // Bad: into a directory planted as a link in the output directory (below).
        (&["planted", "inner"], &["a"]),
    ];
    let torrent = dir.path().join("t.torrent");
    fs::write(&torrent, torrent_with_links(&links)).unwrap();
    let data = dir.path().join("data");
    fs::create_dir_all(data.join("t")).unwrap();
    fs::write(data.join("t/a"), b"hello").unwrap();
    fs::write(data.join("t/b"), b"abc").unwrap();

    let out = dir.path().join("out");
    let outside = dir.path().join("outside");
    fs::create_dir_all(out.join("t")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("t/planted")).unwrap();

    let (seeder, addr) = start_seeder("seeder", &torrent, &data, next_loopback(), &["--no-dht"]);
    let mut args = download_args(&torrent, &out, next_loopback(), &[addr]);
    args.push("--no-dht".into());
    let download = spawn_bitfetch("download", &args);
    download.wait(std::time::Duration::from_secs(60), &[&seeder]);
    assert_exit_code(&download, 0, &[&seeder]);
    seeder.stop();

    let t = out.join("t");
    assert_eq!(fs::read(t.join("a")).unwrap(), b"hello");
    let mode = fs::metadata(t.join("a")).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o111,
        (mode & 0o444) >> 2,
        "x gives execute where read: {mode:o}"
    );
    let b_mode = fs::metadata(t.join("b")).unwrap().permissions().mode();
    assert_eq!(b_mode & 0o111, 0, "b has no x attribute: {b_mode:o}");

    assert_eq!(
        fs::read_link(t.join("dir/link")).unwrap(),
        Path::new("../a")
    );
    assert_eq!(fs::read(t.join("dir/link")).unwrap(), b"hello");
    assert_eq!(fs::read_link(t.join("up")).unwrap(), Path::new("dir"));
    for skipped in ["evil", "chain", "to_link"] {
        assert!(
            fs::symlink_metadata(t.join(skipped)).is_err(),
            "{skipped} was made\n{}",
            download.diagnostics()
        );
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "something was made through the planted link"
    );

    let stdout = download.stdout_text();
    let stderr = download.stderr_text();
    for skipped in ["evil", "chain", "to_link", "planted/inner"] {
        assert!(
            !stdout.lines().any(|l| l.ends_with(skipped)),
            "skipped link {skipped} reported as a file:\n{stdout}"
        );
        assert!(
            stderr.contains(&format!("link t/{skipped} skipped")),
            "no notice for {skipped}:\n{stderr}"
        );
    }
    for made in ["t/a", "t/b", "t/dir/link", "t/up"] {
        assert!(
            stdout.lines().any(|l| l.ends_with(made)),
            "{made} missing from stdout:\n{stdout}"
        );
    }
}
