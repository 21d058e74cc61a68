#!/usr/bin/python3
"""A DHT (BEP 5) of libtorrent sessions on loopback, for the end-to-end DHT tests.

Run with Debian's /usr/bin/python3 (python3-libtorrent 2.x); driven by
tests/support/libtorrent_dht.rs (`LtDht`). Starts one libtorrent session per --ip (in this
one process), each listening (TCP and the DHT's UDP) on IP:0 and dialling from IP. Node 0
bootstraps from the --bootstrap addresses (if any); every other node from node 0 and the
--bootstrap addresses. Nothing but the DHT finds peers: no trackers are added, LSD, UPnP,
NAT-PMP, uTP and PEX are off, connections are plaintext.

libtorrent's defaults refuse a DHT where every node is in 127/8: the settings below turn off
the checks that do (one node per IP range in the routing table and in searches, node ids
derived from the external address, "dark internet" addresses, verified ids preferred).

Roles (optional, on chosen nodes):
  --seed-on K --torrent FILE --data DIR     node K seeds FILE from DIR/NAME (seed mode, no
                                            check) and announces it on the DHT.
  --download-on K --magnet URI --save-path DIR
                                            node K downloads URI (give it no tr/x.pe: the DHT
                                            alone finds the peers) and reports progress.

Prints JSON lines on stdout, flushed at once (times in seconds since the start of this
process, `t`):
  {"event":"node","index":i,"address":"IP:PORT"}           once per node, when it listens
  {"event":"ready","nodes":["IP:PORT",...]}                 when every node listens
  {"event":"routing","index":i,"nodes":n}                   when a node's routing table size
                                                            changes
  {"event":"announce","index":i,"info_hash":HEX,"address":"IP:PORT"}
                                                            node i stored an announce_peer
  {"event":"get_peers","index":i,"info_hash":HEX}           node i was asked get_peers
  {"event":"seeding","index":K,"info_hash":HEX}
  {"event":"dht_peers","index":K,"count":n,"since_add":s}   each DHT reply with peers for the
                                                            downloading torrent
  {"event":"peer_connected","index":K,"address":"IP:PORT","since_add":s}
  {"event":"metadata","index":K,"size":n}
  {"event":"finished","index":K,"since_add":s}              every piece verified and written
Exits when --seconds pass (exit 2 if a download was asked for and did not finish, else 0),
when stdin closes with --watch-stdin, or when killed. Errors go to stderr, exit 1.
"""

import argparse
import json
import os
import sys
import threading
import time

import libtorrent as lt

STARTED = time.monotonic()


def say(event, **fields):
    fields = {"event": event, "t": round(time.monotonic() - STARTED, 3), **fields}
    print(json.dumps(fields), flush=True)


def die(message):
    print(f"libtorrent_dht: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def settings_for(ip, bootstrap):
    return {
        "listen_interfaces": f"{ip}:0",
        "outgoing_interfaces": ip,
        "enable_dht": True,
        "dht_bootstrap_nodes": ",".join(bootstrap),
        # Every node is in 127/8: allow many nodes of one range in routing tables and
        # searches, and do not insist on ids derived from (or verified against) the address.
        "dht_restrict_routing_ips": False,
        "dht_restrict_search_ips": False,
        "dht_enforce_node_id": False,
        "dht_prefer_verified_node_ids": False,
        "dht_ignore_dark_internet": False,
        # Re-announce and re-search often: a small test network, not hours of uptime.
        "dht_announce_interval": 5,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "allow_multiple_connections_per_ip": True,
        "min_reconnect_time": 1,
        "out_enc_policy": int(lt.enc_policy.disabled),
        "in_enc_policy": int(lt.enc_policy.enabled),
        "alert_mask": int(
            lt.alert.category_t.error_notification
            | lt.alert.category_t.status_notification
            | lt.alert.category_t.storage_notification
            | lt.alert.category_t.dht_notification
            | lt.alert.category_t.tracker_notification
            | lt.alert.category_t.connect_notification
            | lt.alert.category_t.peer_notification
        ),
        "user_agent": "libtorrent-dht-test/" + lt.__version__,
    }


class Node:
    def __init__(self, index, ip, bootstrap):
        self.index = index
        self.ip = ip
        self.session = lt.session(settings_for(ip, bootstrap))
        self.address = None
        self.routing = -1
        self.handle = None
        self.role = None
        self.added_at = None
        self.seeding = False
        self.finished = False
        self.connected = set()

    def wait_listening(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.session.wait_for_alert(250)
            for alert in self.session.pop_alerts():
                if isinstance(alert, lt.listen_failed_alert):
                    die(f"node {self.index} cannot listen on {self.ip}: {alert.message()}")
                if (
                    isinstance(alert, lt.listen_succeeded_alert)
                    and alert.socket_type == lt.socket_type_t.tcp
                ):
                    self.address = f"{self.ip}:{self.session.listen_port()}"
                    say("node", index=self.index, address=self.address)
                    return
        die(f"node {self.index}: no listen_succeeded_alert for {self.ip} within 30 s")

    def since_add(self):
        return round(time.monotonic() - self.added_at, 3)

    def seed(self, torrent, data):
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(torrent)
        params.save_path = data
        params.flags |= lt.torrent_flags.seed_mode
        params.flags |= lt.torrent_flags.disable_pex | lt.torrent_flags.disable_lsd
        self.handle = self.session.add_torrent(params)
        self.role = "seed"
        self.added_at = time.monotonic()

    def download(self, magnet, save_path):
        params = lt.parse_magnet_uri(magnet)
        if params.trackers or params.peers:
            die("the magnet given to --download-on names trackers or peers: DHT only here")
        params.save_path = save_path
        params.flags |= lt.torrent_flags.disable_pex | lt.torrent_flags.disable_lsd
        self.handle = self.session.add_torrent(params)
        self.role = "download"
        self.added_at = time.monotonic()

    def poll(self, stats):
        """Handles this node's alerts and reports what changed; `stats`: ask for the routing
        table size (answered by an alert handled on a later poll)."""
        if stats:
            self.session.post_dht_stats()
        for alert in self.session.pop_alerts():
            self.on_alert(alert)
        if self.handle is None:
            return
        status = self.handle.status()
        if status.num_peers > len(self.connected):
            self.report_peers()
        if self.role == "seed" and not self.seeding and status.is_seeding:
            self.seeding = True
            say("seeding", index=self.index, info_hash=str(status.info_hashes.v1))
        if self.role == "download" and not self.finished and status.has_metadata and status.is_finished:
            self.flush()
            self.finished = True
            say("finished", index=self.index, since_add=self.since_add(),
                downloaded=status.total_wanted_done)

    def on_alert(self, alert):
        if isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
            die(f"node {self.index}: {alert.message()}")
        if isinstance(alert, lt.dht_stats_alert):
            nodes = sum(bucket["num_nodes"] for bucket in alert.routing_table)
            if nodes != self.routing:
                self.routing = nodes
                say("routing", index=self.index, nodes=nodes)
        elif isinstance(alert, lt.dht_announce_alert):
            say("announce", index=self.index, info_hash=str(alert.info_hash),
                address=f"{alert.ip}:{alert.port}")
        elif isinstance(alert, lt.dht_get_peers_alert):
            say("get_peers", index=self.index, info_hash=str(alert.info_hash))
        elif isinstance(alert, lt.dht_reply_alert) and self.role == "download":
            if alert.num_peers > 0:
                say("dht_peers", index=self.index, count=alert.num_peers, since_add=self.since_add())
        elif isinstance(alert, lt.metadata_received_alert) and self.role == "download":
            say("metadata", index=self.index, size=len(self.handle.torrent_file().info_section()))

    def report_peers(self):
        """Every peer this node's torrent has a connection with, once each."""
        for peer in self.handle.get_peer_info():
            ip, port = peer.ip
            address = f"{ip}:{port}"
            if address not in self.connected:
                self.connected.add(address)
                say("peer_connected", index=self.index, address=address, role=self.role,
                    since_add=self.since_add())

    def flush(self):
        self.handle.flush_cache()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.session.wait_for_alert(250)
            for alert in self.session.pop_alerts():
                if isinstance(alert, lt.cache_flushed_alert):
                    return
                self.on_alert(alert)
        die(f"node {self.index}: no cache_flushed_alert within 30 s")


def watch_stdin(stop):
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        stop.set()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", action="append", required=True, help="one node per --ip")
    parser.add_argument("--bootstrap", action="append", default=[], help="IP:PORT")
    parser.add_argument("--seed-on", type=int, default=-1)
    parser.add_argument("--torrent")
    parser.add_argument("--data")
    parser.add_argument("--download-on", type=int, default=-1)
    parser.add_argument("--magnet")
    parser.add_argument("--save-path")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--watch-stdin", action="store_true")
    args = parser.parse_args()
    if args.seed_on >= 0 and not (args.torrent and args.data):
        die("--seed-on needs --torrent and --data")
    if args.download_on >= 0 and not (args.magnet and args.save_path):
        die("--download-on needs --magnet and --save-path")

    stop = threading.Event()
    if args.watch_stdin:
        threading.Thread(target=watch_stdin, args=(stop,), daemon=True).start()

    nodes = []
    first = Node(0, args.ip[0], args.bootstrap)
    first.wait_listening()
    nodes.append(first)
    for index, ip in enumerate(args.ip[1:], start=1):
        node = Node(index, ip, [first.address, *args.bootstrap])
        node.wait_listening()
        nodes.append(node)
    say("ready", nodes=[n.address for n in nodes])

    if 0 <= args.seed_on < len(nodes):
        nodes[args.seed_on].seed(args.torrent, args.data)
    if 0 <= args.download_on < len(nodes):
        nodes[args.download_on].download(args.magnet, args.save_path)

    deadline = STARTED + args.seconds
    next_stats = 0.0
    while time.monotonic() < deadline and not stop.is_set():
        # Wakes on node 0's alerts, else after 100 ms: every node is looked at that often.
        nodes[0].session.wait_for_alert(100)
        now = time.monotonic()
        stats = now >= next_stats
        if stats:
            next_stats = now + 1
        for node in nodes:
            node.poll(stats)
    downloader = nodes[args.download_on] if 0 <= args.download_on < len(nodes) else None
    if downloader is not None and not downloader.finished:
        print(f"libtorrent_dht: node {args.download_on} did not finish", file=sys.stderr, flush=True)
        os._exit(2)
    os._exit(0)


if __name__ == "__main__":
    main()
