#!/usr/bin/python3
"""libtorrent (Debian's python3-libtorrent) as the reference maker and reader of .torrent files.

Run with Debian's /usr/bin/python3; driven by tests/create_v2.rs. One-shot commands, each
printing one JSON line on stdout (errors go to stderr, exit 1):

  make --dir DIR --piece-length N --mode v1|v2|hybrid --out FILE
      Makes the torrent of DIR (a directory or a single file) the way libtorrent does with
      lt.create_torrent (v2: the v2_only flag, hybrid: the default flags, v1: v1_only), hashes
      it from DIR's parent, writes it to FILE and prints {"v1": HEX|null, "v2": HEX|null}.
  read --torrent FILE
      Loads FILE with lt.torrent_info (which checks it: piece layers against the roots, v1 and
      v2 file lists against each other) and prints what libtorrent read: "v1" and "v2" info
      hashes (hex, or null when the torrent has no such part), "name", "piece_length",
      "num_pieces", "total_size" and "files" ([{"path", "size", "pad"}], pad files included,
      in libtorrent's order).
"""

import argparse
import json
import os
import sys

import libtorrent as lt


def die(message):
    print(f"libtorrent_create: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def hashes(ti):
    ih = ti.info_hashes()
    return {
        "v1": str(ih.v1) if ih.has_v1() else None,
        "v2": str(ih.v2) if ih.has_v2() else None,
    }


def make(args):
    flags = {
        "v1": lt.create_torrent.v1_only,
        "v2": lt.create_torrent.v2_only,
        "hybrid": 0,
    }[args.mode]
    fs = lt.file_storage()
    lt.add_files(fs, args.dir)
    ct = lt.create_torrent(fs, args.piece_length, flags=flags)
    lt.set_piece_hashes(ct, os.path.dirname(os.path.abspath(args.dir)))
    data = lt.bencode(ct.generate())
    with open(args.out, "wb") as f:
        f.write(data)
    print(json.dumps(hashes(lt.torrent_info(data))), flush=True)


def read(args):
    ti = lt.torrent_info(args.torrent)
    fs = ti.files()
    files = [
        {
            "path": fs.file_path(i),
            "size": fs.file_size(i),
            "pad": bool(fs.file_flags(i) & lt.file_storage.flag_pad_file),
        }
        for i in range(fs.num_files())
    ]
    print(
        json.dumps(
            {
                **hashes(ti),
                "name": ti.name(),
                "piece_length": ti.piece_length(),
                "num_pieces": ti.num_pieces(),
                "total_size": ti.total_size(),
                "files": files,
            }
        ),
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", required=True)
    m.add_argument("--piece-length", type=int, required=True)
    m.add_argument("--mode", choices=["v1", "v2", "hybrid"], required=True)
    m.add_argument("--out", required=True)
    r = sub.add_parser("read")
    r.add_argument("--torrent", required=True)
    args = parser.parse_args()
    try:
        {"make": make, "read": read}[args.command](args)
    except Exception as e:  # noqa: BLE001 - any libtorrent failure is the answer
        die(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
