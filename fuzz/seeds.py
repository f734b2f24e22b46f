#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/seed-*.

Seeds are the example payloads of the gateway's own tests and docs, in every format,
plus the rule files in rules/. Run from anywhere: python3 fuzz/seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = os.path.join(HERE, "..", "rules")


def head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    for extra, fmt, code in ((0xFF, ">B", 24), (0xFFFF, ">H", 25), (0xFFFFFFFF, ">I", 26)):
        if n <= extra:
            return bytes([major << 5 | code]) + struct.pack(fmt, n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


def cbor(v):
    """A minimal CBOR encoder: enough for seeds (ints, floats, text, bytes, lists, maps)."""
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, float):
        return b"\xfb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return head(3, len(b)) + b
    if isinstance(v, bytes):
        return head(2, len(v)) + v
    if isinstance(v, list):
        return head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict):
        return head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(v)


OBJECTS = [
    {"temperature": 21.5, "ok": True, "label": "a"},
    {"ts": 1764235201123, "t": 1},
    {"time": 1764235201.5, "t": 1},
    {"ts": "2025-11-27T09:20:01+01:00", "t": 1},
    {"env": {"t": 1, "h": {"rel": 2}}, "gone": None},
    {"device": "d-1", "seq": 42, "ts": 1764235200000, "temperature": 20.25, "humidity": 41.5,
     "battery": 3.61, "door_open": False},
]

SENML = [
    [{"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e09, "bu": "%RH", "v": 20.0,
      "n": "humidity"}, {"n": "temperature", "u": "Cel", "v": 23.1},
     {"n": "humidity", "v": 21.0, "t": 60}],
    [{"n": "t", "v": 1, "t": -5}, {"n": "s", "vs": "on"}, {"n": "b", "vb": True},
     {"n": "d", "vd": "AQID"}, {"n": "e", "s": 4.5, "bs": 1}],
    [{"bver": 10, "bn": "dev/", "bv": 1, "n": "a", "v": 2, "ut": 5}],
]

# SenML CBOR uses the integer labels of RFC 8428 section 6.
LABELS = {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6, "n": 0, "u": 1,
          "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}


def labelled(pack):
    return [{LABELS[k]: v for k, v in r.items()} for r in pack]


def json(v):
    import json as j
    return j.dumps(v).encode()


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def main():
    json_objs = [json(o) for o in OBJECTS] + [b"not json {", b'{"ts":', b"{}", b'{"a":[1]}']
    cbor_objs = [cbor(o) for o in OBJECTS] + [b"\xa0", b"\xbf\x61a\x01\xff", b"\xff\x00garbage",
                                             b"\xa1\x61t\xc1\x1a\x69\x27\x4f\x80"]
    senml_json = [json(p) for p in SENML] + [b"[]", b"[1]", b'[{"n":"x"}]']
    senml_cbor = [cbor(p) for p in SENML] + [cbor(labelled(p)) for p in SENML] + [b"\x80",
                                                                                   b"\x9f\xa1\x00\x61x\xff"]
    for i, d in enumerate(json_objs):
        write("decode_json", f"{i}", d)
    for i, d in enumerate(cbor_objs):
        write("decode_cbor", f"{i}", d)
    for i, d in enumerate(senml_json):
        write("decode_senml_json", f"{i}", d)
    for i, d in enumerate(senml_cbor):
        write("decode_senml_cbor", f"{i}", d)
    # decode_any: first byte = content type selector (see fuzz_targets/decode_any.rs).
    any_seeds = [(0, d) for d in json_objs + cbor_objs + senml_json + senml_cbor]
    any_seeds += [(2, json_objs[0]), (3, json_objs[1]), (4, cbor_objs[0]), (5, senml_json[0]),
                  (6, senml_cbor[0]), (7, json_objs[0]), (6, json_objs[0])]
    for i, (sel, d) in enumerate(any_seeds):
        write("decode_any", f"{i}", bytes([sel]) + d)
    for name in sorted(os.listdir(RULES)):
        if name.endswith(".toml"):
            with open(os.path.join(RULES, name), "rb") as f:
                write("rules_parse", name, f.read())


if __name__ == "__main__":
    main()
