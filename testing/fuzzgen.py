"""Hostile input generators shared by the fuzz bench (bench/fuzz.py) and the hypothesis tests:
msgpack/JSON values with edge numbers and odd strings, random and mutated wire frames (lying
length fields, msgpack garbage, splices), JSON mutations, and cut points for feeding a stream
in pieces."""
from __future__ import annotations

import json
import random
import struct
from typing import Any

from peer.wire import DEFAULT_MAX_HEADER, DEFAULT_MAX_PAYLOAD, FIXED_HEADER_SIZE, Frame, FrameType, encode_frame


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A msgpack/JSON-able hostile value: edge numbers, odd strings, nesting."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, -2**63, 2**64 - 1, 255, 65536])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1e308, -1e-308, 0.5, 3.0])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice(["", "a", "..", "../../etc/passwd", "\x00", "é✓", "x" * 300, "1", "latest"])
    if kind == 4:
        return rng.randbytes(rng.choice([0, 1, 31, 32, 33, 64]))
    if kind == 5:
        return rng.randrange(-10, 10**6)
    if kind == 6:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randrange(1, 12)))
    if kind == 7:
        return rng.randbytes(rng.randrange(0, 64)).hex()
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def random_key(rng: random.Random) -> str:
    return rng.choice(["i", "o", "n", "z", "k", "t", "h", "m", "c", "p", "d", "err", "eph", "nonce",
                       "id", "sig", "mac", "reason", "by", "x", ""])


def random_header(rng: random.Random) -> dict:
    return {random_key(rng): random_value(rng) for _ in range(rng.randrange(0, 6))}


def random_frame(rng: random.Random) -> bytes:
    type_ = rng.choice(list(FrameType) + [0, 5, 99, 255])
    payload = rng.randbytes(rng.choice([0, 0, 1, 16, 100, 1000, 3000]))
    return encode_frame(Frame(int(type_), random_header(rng), payload, rng.choice([0, 0, 1, 255])))


U32_EDGES = [0, 1, 2, 15, 16, 17, 4095, 4096, 4097, DEFAULT_MAX_HEADER - 1, DEFAULT_MAX_HEADER,
             DEFAULT_MAX_HEADER + 1, 2**31 - 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 1, 2, DEFAULT_MAX_PAYLOAD - 1, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD + 1, 2**32,
             2**63 - 1, 2**63, 2**64 - 1]
# msgpack bytes that stress a decoder: reserved 0xc1, huge declared containers/strings, deep
# nesting, ext types, non-string map keys, truncated numbers.
MSGPACK_GARBAGE = [b"\xc1", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                   b"\xc6\xff\xff\xff\xff", b"\x91" * 3000, b"\x81\xa1a" * 1500 + b"\xc0",
                   b"\xd4\x01\x00", b"\xc7\xff\x05", b"\xd6\xff\x00\x00\x00\x00", b"\x81\x01\x02",
                   b"\x81\xc0\xc0", b"\xcf\x00", b"\x90", b"\xa5hello", b"\x80\x80", b"\x81\x91\x01\x02",
                   b"\xde\x00\x01\xc4\x01a\xc0"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Apply 1-3 random mutations: bit flips, byte edits, truncation, extension, lying length
    fields, msgpack garbage in the header, splices, or wholesale random bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(11)
        if op == 0 and buf:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # byte overwrite, biased to the fixed header
            i = rng.randrange(min(len(buf), FIXED_HEADER_SIZE + 8)) if rng.random() < 0.6 else rng.randrange(len(buf))
            buf[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:  # truncate
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 3:  # extend
            buf += rng.randbytes(rng.choice([1, 5, 17, 100, 4000]))
        elif op == 4 and len(buf) >= FIXED_HEADER_SIZE:  # header length lies
            struct.pack_into("!I", buf, 5, rng.choice(U32_EDGES + [struct.unpack_from("!I", buf, 5)[0] + rng.choice([-1, 1])]) % 2**32)
        elif op == 5 and len(buf) >= FIXED_HEADER_SIZE:  # payload length lies
            struct.pack_into("!Q", buf, 9, rng.choice(U64_EDGES + [struct.unpack_from("!Q", buf, 9)[0] + rng.choice([-1, 1])]) % 2**64)
        elif op == 6 and len(buf) >= FIXED_HEADER_SIZE:  # msgpack garbage as the header, length fixed up
            junk = rng.choice(MSGPACK_GARBAGE) if rng.random() < 0.7 else rng.randbytes(rng.randrange(1, 64))
            hlen = struct.unpack_from("!I", buf, 5)[0]
            rest = bytes(buf[FIXED_HEADER_SIZE + hlen:]) if FIXED_HEADER_SIZE + hlen <= len(buf) else b""
            struct.pack_into("!I", buf, 5, len(junk))
            buf[FIXED_HEADER_SIZE:] = junk + rest
        elif op == 7 and len(buf) >= 4:  # magic / version / type
            buf[rng.randrange(4)] = rng.randrange(256)
        elif op == 8:  # splice another frame in
            other = random_frame(rng)
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = other[:rng.randrange(len(other) + 1)]
        elif op == 9 and buf:  # delete a range
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randrange(1, 32)]
        else:  # random bytes (sometimes behind a valid magic + version)
            buf = bytearray((b"LB\x01" if rng.random() < 0.5 else b"") + rng.randbytes(rng.randrange(0, 200)))
    return bytes(buf)


def split_points(rng: random.Random, n: int) -> list[int]:
    """Cut positions for feeding ``n`` bytes in pieces (none, one-byte pieces, or random cuts)."""
    mode = rng.randrange(4)
    if mode == 0 or n < 2:
        return []
    if mode == 1 and n <= 400:
        return list(range(1, n))
    return sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 8))))


def pieces(data: bytes, splits: list[int]) -> list[bytes]:
    cuts = [0, *splits, len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def mutate_json(rng: random.Random, value: Any) -> Any:
    """A copy of a JSON value with one node replaced, deleted, retyped or made hostile."""
    value = json.loads(json.dumps(value))
    paths: list[tuple] = []

    def walk(v: Any, path: tuple) -> None:
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v[:20]):
                walk(x, path + (i,))

    walk(value, ())
    path = rng.choice(paths)
    new = rng.choice([
        lambda: random_value(rng), lambda: None, lambda: [], lambda: {}, lambda: "x" * 100_000,
        lambda: 10**30, lambda: -1, lambda: 1.5, lambda: True, lambda: nested(rng.randrange(50, 200)),
        lambda: "../../" + rng.choice(["etc/passwd", "lbfuzz-canary"]), lambda: [1] * 1000,
    ])()
    new = jsonable(new)
    if not path:
        return new
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
    elif rng.random() < 0.1 and isinstance(parent, dict):
        parent[random_key(rng) + "extra"] = new
    else:
        parent[path[-1]] = new
    return value


def jsonable(v: Any) -> Any:
    """``random_value`` output made JSON-encodable (bytes become hex strings)."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    return v


def nested(depth: int) -> Any:
    v: Any = 0
    for i in range(depth):
        v = [v] if i % 2 else {"a": v}
    return v
