#!/usr/bin/python3
"""libtorrent (Debian's python3-libtorrent) as a reference client for the end-to-end tests.

Run with Debian's /usr/bin/python3 (the first python3 on PATH may lack the bindings); driven
by tests/support/clients.rs (`Libtorrent`). Every session stays on loopback: it listens on,
and dials from, the one address it is given; DHT, LSD, UPnP, NAT-PMP, uTP and PEX are off
(--pex turns PEX on); connections are plaintext (libtorrent would try an encrypted handshake
first otherwise).

Commands (each prints JSON lines on stdout, flushed at once; errors go to stderr, exit 1):

  seed --bind IP --torrent FILE --save-path DIR [--peer IP:PORT]...
      Seeds FILE whose data is DIR/NAME (seed mode: no check), until killed, dialling each
      --peer (a downloader that cannot be given peers, such as aria2 with a magnet).
      Prints {"event":"listening","address":"IP:PORT"}, then {"event":"seeding"}.
  download --bind IP --save-path DIR (--magnet URI | --torrent FILE) [--peer IP:PORT]...
      Downloads into DIR/NAME, dialling each --peer with handle.connect_peer (as well as the
      magnet's own x.pe peers and trackers). Prints `listening`, {"event":"metadata",...} once
      the info dictionary is in, `status` lines every second and {"event":"finished"} once
      every piece is verified and written; exits 0 then. --seconds N gives up after N s
      (exit 2), a hang guard only. --stay keeps it running (and printing `status`) after
      `finished`, until killed.

  Both take --pex (BEP 11 peer exchange on: `status` lines then list the peers' addresses
  as `addresses`) and --upload-limit / --download-limit BYTES_PER_SECOND.
  parse-magnet URI
      Prints what lt.parse_magnet_uri reads: info hash (v1), name, trackers, peers.
  make-magnet --torrent FILE
      Prints lt.make_magnet_uri of FILE's torrent_info.
  create --source PATH --out FILE --piece-length N [--kind hybrid|v2|v1] [--tracker URL]
      Makes FILE from PATH (a file or a directory) with lt.create_torrent: hybrid (v1 + v2,
      BEP 47 pad files; libtorrent's default), v2-only or v1-only. Prints {"event":"created"}
      with what `inspect` prints.
  inspect --torrent FILE
      Prints libtorrent's reading of FILE: {"event":"torrent", "info_hash" (v1 hex, null for
      v2-only), "info_hash_v2" (SHA-256 hex, null for v1), "name", "total_size" (pad files
      included), "num_pieces", "piece_length", "last_piece_size", "files": [{"path",
      "size", "pad"}] in libtorrent's order}; or {"event":"refused","error":...} (exit 0)
      when libtorrent cannot load it.

  `seed`, `download` and `metadata` events carry "info_hash" (v1) and "info_hash_v2" (hex,
  null when the torrent has no such hash).
"""

import argparse
import json
import os
import sys
import time

import libtorrent as lt


def hashes(info_hashes):
    """(v1 hex or None, v2 hex or None) of an lt.info_hash_t."""
    v1 = str(info_hashes.v1) if info_hashes.has_v1() else None
    v2 = str(info_hashes.v2) if info_hashes.has_v2() else None
    return v1, v2


def say(event, **fields):
    fields = {"event": event, **fields}
    print(json.dumps(fields), flush=True)


def die(message):
    print(f"libtorrent_client: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def address(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not IP:PORT: {text!r}")
    return (host.strip("[]"), int(port))


def start_session(bind):
    settings = {
        "listen_interfaces": f"{bind}:0",
        # Dial from the same address, so the other side sees who we are.
        "outgoing_interfaces": bind,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        # Otherwise the self-connection a tracker hands out bans the whole address.
        "allow_multiple_connections_per_ip": True,
        # Otherwise a refused peer is retried after 60 s × failures.
        "min_reconnect_time": 1,
        "out_enc_policy": int(lt.enc_policy.disabled),
        "in_enc_policy": int(lt.enc_policy.enabled),
        "alert_mask": int(
            lt.alert.category_t.error_notification
            | lt.alert.category_t.status_notification
            | lt.alert.category_t.storage_notification
        ),
        "user_agent": "libtorrent-test/" + lt.__version__,
    }
    session = lt.session(settings)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        session.wait_for_alert(500)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.listen_failed_alert):
                die(f"cannot listen on {bind}: {alert.message()}")
            if isinstance(alert, lt.listen_succeeded_alert) and alert.socket_type == lt.socket_type_t.tcp:
                say("listening", address=f"{bind}:{session.listen_port()}")
                return session
    die(f"no listen_succeeded_alert for {bind} within 30 s")


def loopback_flags(params, pex=False):
    params.flags |= lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
    if not pex:
        params.flags |= lt.torrent_flags.disable_pex
    return params


def apply_limits(handle, args):
    if args.upload_limit:
        handle.set_upload_limit(args.upload_limit)
    if args.download_limit:
        handle.set_download_limit(args.download_limit)


def seed(args):
    session = start_session(args.bind)
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(args.torrent)
    params.save_path = args.save_path
    loopback_flags(params, args.pex)
    params.flags |= lt.torrent_flags.seed_mode
    handle = session.add_torrent(params)
    apply_limits(handle, args)
    for peer in args.peer:
        handle.connect_peer(peer)
    seeding = False
    while True:
        session.wait_for_alert(1000)
        for alert in session.pop_alerts():
            if isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
                die(alert.message())
        status = handle.status()
        if not seeding and status.is_seeding:
            v1, v2 = hashes(handle.info_hashes())
            say("seeding", name=status.name, info_hash=v1, info_hash_v2=v2)
            seeding = True


def download(args):
    session = start_session(args.bind)
    if args.magnet:
        params = lt.parse_magnet_uri(args.magnet)
    else:
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(args.torrent)
    params.save_path = args.save_path
    loopback_flags(params, args.pex)
    handle = session.add_torrent(params)
    apply_limits(handle, args)
    for peer in args.peer:
        handle.connect_peer(peer)
    deadline = time.monotonic() + args.seconds
    finished = False
    last_status = 0.0
    while time.monotonic() < deadline:
        session.wait_for_alert(250)
        for alert in session.pop_alerts():
            if isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
                die(alert.message())
            if isinstance(alert, lt.metadata_received_alert):
                info = handle.torrent_file()
                v1, v2 = hashes(info.info_hashes())
                say(
                    "metadata",
                    name=info.name(),
                    info_hash=v1,
                    info_hash_v2=v2,
                    size=info.total_size(),
                    metadata_size=len(info.info_section()),
                )
        status = handle.status()
        now = time.monotonic()
        if now - last_status >= 1:
            last_status = now
            extra = {}
            if args.pex:
                extra["addresses"] = sorted(f"{p.ip[0]}:{p.ip[1]}" for p in handle.get_peer_info())
            say(
                "status",
                state=str(status.state),
                has_metadata=status.has_metadata,
                progress=status.progress,
                peers=status.num_peers,
                downloaded=status.total_wanted_done,
                **extra,
            )
        if status.has_metadata and status.is_finished and not finished:
            flush(session, handle)
            say("finished", name=status.name, downloaded=status.total_wanted_done)
            finished = True
        if finished and not args.stay:
            return
        if finished:
            deadline = time.monotonic() + args.seconds
    die(f"not finished within {args.seconds} s: {handle.status().state}")


def flush(session, handle):
    """Waits until what was downloaded is written (bounded)."""
    handle.flush_cache()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        session.wait_for_alert(500)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.cache_flushed_alert):
                return
    die("no cache_flushed_alert within 30 s")


def parse_magnet(args):
    params = lt.parse_magnet_uri(args.uri)
    v1, v2 = hashes(params.info_hashes)
    say(
        "magnet",
        info_hash=v1,
        info_hash_v2=v2,
        name=params.name,
        trackers=list(params.trackers),
        peers=[f"{ip}:{port}" for ip, port in params.peers],
    )


def make_magnet(args):
    say("magnet", uri=lt.make_magnet_uri(lt.torrent_info(args.torrent)))


def describe(info):
    """What libtorrent reads in a torrent_info (see `inspect`)."""
    v1, v2 = hashes(info.info_hashes())
    files = info.files()
    return {
        "info_hash": v1,
        "info_hash_v2": v2,
        "name": info.name(),
        "total_size": info.total_size(),
        "num_pieces": info.num_pieces(),
        "piece_length": info.piece_length(),
        "last_piece_size": info.piece_size(info.num_pieces() - 1) if info.num_pieces() else 0,
        "files": [
            {
                "path": files.file_path(i),
                "size": files.file_size(i),
                "pad": bool(files.file_flags(i) & lt.file_storage.flag_pad_file),
            }
            for i in range(files.num_files())
        ],
    }


def create(args):
    flags = {
        "hybrid": 0,
        "v2": lt.create_torrent.v2_only,
        "v1": lt.create_torrent.v1_only,
    }[args.kind]
    source = os.path.abspath(args.source)
    storage = lt.file_storage()
    lt.add_files(storage, source)
    if storage.num_files() == 0:
        die(f"no files under {source}")
    creator = lt.create_torrent(storage, args.piece_length, flags=flags)
    if args.tracker:
        creator.add_tracker(args.tracker)
    lt.set_piece_hashes(creator, os.path.dirname(source))
    with open(args.out, "wb") as out:
        out.write(lt.bencode(creator.generate()))
    say("created", **describe(lt.torrent_info(args.out)))


def inspect(args):
    try:
        info = lt.torrent_info(args.torrent)
    except RuntimeError as e:
        say("refused", error=str(e))
        return
    say("torrent", **describe(info))


def add_common(p):
    p.add_argument("--pex", action="store_true")
    p.add_argument("--upload-limit", type=int, default=0)
    p.add_argument("--download-limit", type=int, default=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("seed")
    p.add_argument("--bind", required=True)
    p.add_argument("--torrent", required=True)
    p.add_argument("--save-path", required=True)
    p.add_argument("--peer", type=address, action="append", default=[])
    add_common(p)
    p.set_defaults(run=seed)
    p = commands.add_parser("download")
    p.add_argument("--bind", required=True)
    p.add_argument("--save-path", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--magnet")
    source.add_argument("--torrent")
    p.add_argument("--peer", type=address, action="append", default=[])
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--stay", action="store_true")
    add_common(p)
    p.set_defaults(run=download)
    p = commands.add_parser("parse-magnet")
    p.add_argument("uri")
    p.set_defaults(run=parse_magnet)
    p = commands.add_parser("make-magnet")
    p.add_argument("--torrent", required=True)
    p.set_defaults(run=make_magnet)
    p = commands.add_parser("create")
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--piece-length", type=int, required=True)
    p.add_argument("--kind", choices=["hybrid", "v2", "v1"], default="hybrid")
    p.add_argument("--tracker")
    p.set_defaults(run=create)
    p = commands.add_parser("inspect")
    p.add_argument("--torrent", required=True)
    p.set_defaults(run=inspect)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
