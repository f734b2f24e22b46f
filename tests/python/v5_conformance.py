"""MQTT 5 conformance scenarios for the gateway's embedded broker, driven by paho-mqtt
(2.1.0), the client library independent of rumqttc that the Rust tests compare against.

Usage: python3 v5_conformance.py SCENARIO PORT TOPIC

Each scenario connects its own clients to 127.0.0.1:PORT, works on TOPIC (and topics
under it), and prints one JSON line: what its clients received, in order. The Rust test
(tests/tests/conformance_v5.rs) makes the assertions. Every wait has a timeout; a
timeout is an error (exit status 1) that names what was awaited.
"""

import json
import queue
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 10.0


class Client:
    """One MQTT 5 connection whose received messages and SUBACKs land on queues."""

    def __init__(
        self,
        port,
        client_id,
        max_packet_size=None,
        receive_maximum=None,
        manual_ack=False,
        clean_start=True,
        session_expiry=None,
        will=None,
    ):
        """`will`: (topic, payload, delay in seconds) of a QoS 1 will."""
        self.id = client_id
        self.messages = queue.Queue()
        self.subacks = queue.Queue()
        self.connacks = queue.Queue()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        self.c.on_connect = lambda c, u, flags, rc, props: self.connacks.put((rc, props, flags))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        if will is not None:
            topic, payload, delay = will
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.WillDelayInterval = delay
            self.c.will_set(topic, payload, qos=1, properties=will_props)
        props = Properties(PacketTypes.CONNECT)
        if max_packet_size is not None:
            props.MaximumPacketSize = max_packet_size
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        if session_expiry is not None:
            props.SessionExpiryInterval = session_expiry
        self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
        self.c.loop_start()
        rc, self.connack_properties, flags = self.get(self.connacks, "CONNACK")
        self.session_present = bool(flags.session_present)
        if rc.is_failure:
            raise SystemExit(f"{client_id}: CONNACK refused: {rc}")

    def get(self, q, what):
        try:
            return q.get(timeout=WAIT)
        except queue.Empty:
            raise SystemExit(f"{self.id}: no {what} within {WAIT} s")

    def subscribe(self, topic, **options):
        self.c.subscribe(topic, options=SubscribeOptions(qos=1, **options))
        self.get(self.subacks, f"SUBACK for {topic}")

    def publish(self, topic, payload, retain=False, **properties):
        props = Properties(PacketTypes.PUBLISH)
        for name, value in properties.items():
            setattr(props, name, value)
        info = self.c.publish(topic, payload, qos=1, retain=retain, properties=props)
        info.wait_for_publish(timeout=WAIT)
        if not info.is_published():
            raise SystemExit(f"{self.id}: no PUBACK for {payload!r} within {WAIT} s")

    def until(self, payload):
        """Messages received up to and including the first with `payload`."""
        out = []
        while True:
            msg = self.get(self.messages, f"message {payload!r}")
            out.append(msg)
            if msg.payload == payload.encode():
                return out

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()

    def lose(self):
        """Closes the socket without DISCONNECT, as a device that lost its network."""
        self.c.loop_stop()
        self.c.socket().close()


def describe(msg):
    """A received message as JSON: payload, flags and the properties it carried."""
    props = msg.properties.json() if msg.properties is not None else {}
    return {
        "payload": msg.payload.decode(errors="replace"),
        "qos": msg.qos,
        "retain": bool(msg.retain),
        "properties": props,
    }


def described(msgs):
    return [describe(m) for m in msgs]


def properties(port, topic):
    sub = Client(port, "paho-props-sub")
    sub.subscribe(topic)
    pub = Client(port, "paho-props-pub")
    pub.publish(
        topic,
        '{"temperature":21.5}',
        UserProperty=[("unit", "celsius"), ("site", "north"), ("unit", "kelvin")],
        ContentType="application/json",
        PayloadFormatIndicator=1,
        ResponseTopic="replies/paho",
        CorrelationData=b"\x00\x01corr",
    )
    return {"received": described(sub.until('{"temperature":21.5}'))}


def retained_expiry(port, topic):
    pub = Client(port, "paho-exp-pub")
    pub.publish(topic, "expiring", retain=True, MessageExpiryInterval=3, UserProperty=[("k", "v")])
    published = time.monotonic()
    time.sleep(1.2)  # the behaviour under test is the passing of time
    early = Client(port, "paho-exp-early")
    early.subscribe(topic)
    pub.publish(topic, "marker-early")
    got_early = early.until("marker-early")
    time.sleep(max(0.0, published + 3.3 - time.monotonic()))
    late = Client(port, "paho-exp-late")
    late.subscribe(topic)
    pub.publish(topic, "marker-late")
    return {"early": described(got_early), "late": described(late.until("marker-late"))}


def no_local(port, topic):
    own = Client(port, "paho-nolocal")
    own.subscribe(topic, noLocal=True)
    other = Client(port, "paho-nolocal-other")
    other.subscribe(topic)
    own.publish(topic, "own")
    other.publish(topic, "other")
    return {"nolocal": described(own.until("other")), "control": described(other.until("other"))}


def retain_as_published(port, topic):
    pub = Client(port, "paho-rap-pub")
    pub.publish(topic, "first", retain=True)
    keep = Client(port, "paho-rap-keep")
    keep.subscribe(topic, retainAsPublished=True)
    clear = Client(port, "paho-rap-clear")
    clear.subscribe(topic)
    pub.publish(topic, "second", retain=True)
    pub.publish(topic, "third")
    return {"keep": described(keep.until("third")), "clear": described(clear.until("third"))}


def retain_handling(port, topic):
    pub = Client(port, "paho-rh-pub")
    result = {}
    for handling in (0, 1, 2):
        t = f"{topic}/rh{handling}"
        pub.publish(t, "kept", retain=True)
        sub = Client(port, f"paho-rh{handling}")
        sub.subscribe(t, retainHandling=handling)
        pub.publish(t, "m1")
        first = sub.until("m1")
        sub.subscribe(t, retainHandling=handling)
        pub.publish(t, "m2")
        result[str(handling)] = described(first + sub.until("m2"))
    return result


def max_packet_size(port, topic):
    small = Client(port, "paho-mps-small", max_packet_size=200)
    small.subscribe(topic)
    control = Client(port, "paho-mps-control")
    control.subscribe(topic)
    pub = Client(port, "paho-mps-pub")
    pub.publish(topic, "x" * 1000)
    pub.publish(topic, "small")
    return {"small": described(small.until("small")), "control": described(control.until("small"))}


def receive_maximum(port, topic):
    """A subscriber with Receive Maximum 2 that acknowledges late: what it received before
    each round of acknowledgements, and the broker's own Receive Maximum."""
    sub = Client(port, "paho-rm-sub", receive_maximum=2, manual_ack=True)
    sub.subscribe(topic)
    pub = Client(port, "paho-rm-pub")
    for i in range(6):
        pub.publish(topic, f"m{i}")
    windows = []
    while sum(len(w) for w in windows) < 6:
        window = [sub.get(sub.messages, "message") for _ in range(2)]
        # Two round trips through the broker: a third message would have come meanwhile.
        sub.subscribe(f"{topic}/sync")
        sub.subscribe(f"{topic}/sync")
        while not sub.messages.empty():
            window.append(sub.messages.get())
        windows.append([m.payload.decode() for m in window])
        for m in window:
            sub.c.ack(m.mid, m.qos)
    return {
        "broker_receive_maximum": getattr(sub.connack_properties, "ReceiveMaximum", None),
        "windows": windows,
    }


def will_delay(port, topic):
    """A will delayed by 2 s: when it arrived after the connection was lost."""
    watcher = Client(port, "paho-wd-watcher")
    watcher.subscribe(topic)
    device = Client(port, "paho-wd-device", session_expiry=60, will=(topic, "paho-wd-device", 2))
    lost = time.monotonic()
    device.lose()
    will = watcher.get(watcher.messages, "the will")
    return {"will": describe(will), "after_s": time.monotonic() - lost}


def will_cancelled(port, topic):
    """A will delayed by 2 s, its session resumed after the loss: what the watcher got."""
    watcher = Client(port, "paho-wc-watcher")
    watcher.subscribe(topic)
    device = Client(port, "paho-wc-device", session_expiry=60, will=(topic, "paho-wc-device", 2))
    lost = time.monotonic()
    device.lose()
    back = Client(port, "paho-wc-device", clean_start=False, session_expiry=60)
    resumed_after_s = time.monotonic() - lost
    time.sleep(max(0.0, lost + 2.5 - time.monotonic()))  # the behaviour under test is time
    watcher.publish(topic, "marker")
    return {
        "session_present": back.session_present,
        "resumed_after_s": resumed_after_s,
        "received": described(watcher.until("marker")),
    }


def offline_queue(port, topic):
    """Messages published while a persistent session's client was away."""
    sub = Client(port, "paho-offline", session_expiry=60)
    sub.subscribe(topic)
    sub.lose()
    pub = Client(port, "paho-offline-pub")
    for i in range(3):
        pub.publish(topic, f"m{i}")
    back = Client(port, "paho-offline", clean_start=False, session_expiry=60)
    return {"session_present": back.session_present, "received": described(back.until("m2"))}


SCENARIOS = {
    f.__name__: f
    for f in (
        properties,
        retained_expiry,
        no_local,
        retain_as_published,
        retain_handling,
        max_packet_size,
        receive_maximum,
        will_delay,
        will_cancelled,
        offline_queue,
    )
}

if __name__ == "__main__":
    name, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps(SCENARIOS[name](port, topic)), flush=True)
