#!/usr/bin/python3
"""A DNS server for benchmarks on 127.0.0.1 that answers NXDOMAIN to every query at
once (UDP). rspamd and tenso's resolver point here during `SPAM=1 compare.sh`, so the
spam path costs what rspamd's rules cost, not a DNS timeout per message (this machine
has no resolver that reaches the internet). Usage: nxdns.py PORT"""
import socket
import sys

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    query, peer = sock.recvfrom(4096)
    if len(query) < 12:
        continue
    end = 12
    while end < len(query) and query[end] != 0:  # the question's name, label by label
        end += 1 + query[end]
    end += 5  # root label, QTYPE, QCLASS
    if end > len(query):
        continue
    flags = 0x8000 | (query[2] & 0x79) << 8 | 0x80 | 3  # QR, opcode+RD kept, RA, NXDOMAIN
    header = query[:2] + flags.to_bytes(2, "big") + b"\x00\x01" + b"\x00" * 6
    sock.sendto(header + query[12:end], peer)
