package replicator

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
)

// Versions and capabilities of the wire protocol (see wire.go for the
// layouts and docs/INTERNALS.md, "Versions and upgrades", for the upgrade
// procedure).
//
// A wire version names a set of message layouts; the version byte in a
// message's header is the version that defined the layout it is encoded
// in, so a message whose layout never changed still says 1. A later
// version may only append fields at the end of a message (optional
// fields) or add message types; it never reinterprets existing fields.
// Record flags are not optional: a new flag needs a new message type or a
// negotiated version, never a flag bit sent to a node that may not know it.
//
// Negotiation happens on every replication stream, after a hello that
// the previous release (b4e49ea, which requires version 1 exactly and
// rejects unknown types) accepts unchanged:
//
//   - A node of this release starts its 32-byte hello nonce with helloTag
//     (8 bytes; the other 24 are random). The old release only uses the
//     nonce as key-derivation salt, so it accepts a tagged hello.
//   - If both nonces carry the tag, each side sends msgCaps as its first
//     frame (both sides send, then both read):
//     u8 min version | u8 max version | u64 capability bits | str node name,
//     later fields appended (ignored by this release). Both then speak
//     the highest common version, min(max_d, max_l); if that is below
//     max(min_d, min_l) the stream fails with errNoCommonVersion.
//   - Otherwise the peer is a legacy node: the stream speaks version 1 and
//     only the message types 1..10 go to it (no capabilities).
//
// A node of this release tolerates what a later release may send:
//   - on a stream, a request of an unknown type gets msgUnknown
//     (u8 the type) and the stream goes on;
//   - an unknown gossip message type is ignored (debug log);
//   - a gossiped msgRecords of a version above ours is decoded by our
//     layout and its trailing (optional) fields are ignored.
//
// A sender uses a new exchange only with a peer whose capabilities
// include it (peerCaps) and must accept msgUnknown from a peer that does
// not know it after all (errUnknownRequest from recv), falling back to
// the older exchange. A new gossip type reaches every node, legacy ones
// included (they drop it with a warning), so it must be optional: a node
// that ignores it loses nothing that anti-entropy does not bring.

// wireCaps is a set of capability bits.
type wireCaps uint64

// Capability bits. A bit, once given a meaning, keeps it.
const (
	// capTolerant: the node negotiates, answers unknown requests with
	// msgUnknown and ignores unknown gossip types. Every node of this
	// release and later has it.
	capTolerant wireCaps = 1 << 0
	// capMerkle: the node serves the tree anti-entropy exchange
	// (msgSync, wiretree.go). A dialer skips the exchange with a peer
	// known to lack it, and falls back to the digest exchange (msgDigest)
	// when it fails (a b4e49ea peer, whose capabilities are unknown,
	// closes the stream on msgSync).
	capMerkle wireCaps = 1 << 1
	// capNextProbe is the test-only exchange of the next-wire profile
	// (msgNextProbe).
	capNextProbe wireCaps = 1 << 62
)

// has reports whether every bit of c is in w.
func (w wireCaps) has(c wireCaps) bool { return w&c == c }

// wireProfile is what a node speaks.
type wireProfile struct {
	min, max byte
	caps     wireCaps
	legacy   bool // behave like b4e49ea on the handshake: no tag, no msgCaps (tests)
	extras   bool // next-wire test behaviours (version_next.go)
}

var (
	// currentWire is this release.
	currentWire = wireProfile{min: 1, max: 1, caps: capTolerant | capMerkle}
	// nextWire plays the next release in tests and in the fault suite
	// (build tag circle_nextwire, or Config.wire): it speaks version 2
	// with another node of its kind, has a capability this release does
	// not know, sends a request type this release does not know to every
	// peer that negotiates, and gossips an unknown message type and
	// version-2 record messages with an optional trailing field.
	nextWire = wireProfile{min: 1, max: 2, caps: capTolerant | capMerkle | capNextProbe, extras: true}
	// legacyWire plays b4e49ea's handshake in tests.
	legacyWire = wireProfile{min: 1, max: 1, legacy: true}
)

// helloTag starts the hello nonce of a node that negotiates.
var helloTag = []byte("circle+\x01")

// errNoCommonVersion: the two nodes share no wire version.
var errNoCommonVersion = errors.New("no common wire version")

// errUnknownRequest: the peer answered msgUnknown (it does not know the
// request type). The stream stays usable.
var errUnknownRequest = errors.New("peer answered: unknown request")

// peerWire is what a peer speaks, as learnt on a stream.
type peerWire struct {
	Min, Max   byte
	Caps       wireCaps
	Version    byte // the version spoken on the stream
	Negotiated bool // false: a legacy peer (b4e49ea); version 1, no caps
}

// wireState caches what peers speak, by name, from their last stream.
type wireState struct {
	mu    sync.Mutex // guards peers and next
	peers map[string]peerWire
	next  nextCounters // the next-wire profile's probes (version_next.go)
}

// wireProfile returns what this node speaks.
func (n *Node) wireProfile() wireProfile {
	if n.cfg.wire != nil {
		return *n.cfg.wire
	}
	return buildWire
}

// notePeerWire records what a stream's peer speaks.
func (n *Node) notePeerWire(name string, pw peerWire) {
	if name == "" {
		return
	}
	n.wire.mu.Lock()
	if n.wire.peers == nil {
		n.wire.peers = make(map[string]peerWire)
	}
	n.wire.peers[name] = pw
	n.wire.mu.Unlock()
}

// peerCaps returns what peer name speaks, as learnt on the last stream
// with it (either direction); ok is false if no stream has told yet (treat
// it as legacy: version 1, no capabilities). Use it to choose an
// exchange:
//
//	if pw, ok := n.peerCaps(p.Name); ok && pw.Caps.has(capMerkle) {
//		err := n.merkleSync(p) // on errors.Is(err, errUnknownRequest) or
//		                        // any failure, fall back:
//	}
//	n.syncWith(p)              // the digest exchange every node knows
//
// A peer can be replaced by another build under the same name (a rolling
// upgrade or downgrade); the cache follows its latest stream, and the
// fallback covers the window in between.
func (n *Node) peerCaps(name string) (peerWire, bool) {
	n.wire.mu.Lock()
	defer n.wire.mu.Unlock()
	pw, ok := n.wire.peers[name]
	return pw, ok
}

// newNonce returns a hello nonce, tagged unless p is legacy.
func (p wireProfile) newNonce() []byte {
	nonce := make([]byte, nonceLen)
	rand.Read(nonce)
	if !p.legacy {
		copy(nonce, helloTag)
	}
	return nonce
}

func tagged(nonce []byte) bool { return bytes.HasPrefix(nonce, helloTag) }

// capsMsg encodes msgCaps.
func capsMsg(p wireProfile, name string) []byte {
	e := newMsg(msgCaps, 12+len(name))
	e.u8(p.min)
	e.u8(p.max)
	e.u64(uint64(p.caps))
	e.str(name)
	return e.b
}

// decodeCaps decodes msgCaps; fields after the name are ignored (later
// versions may append some).
func decodeCaps(body []byte) (min, max byte, caps wireCaps, name string, err error) {
	d := &dec{b: body}
	min, max = d.u8(), d.u8()
	caps = wireCaps(d.u64())
	name = d.str(maxNodeName)
	if d.err == nil && (min == 0 || min > max) {
		d.fail("bad version range")
	}
	return min, max, caps, name, d.err
}

// negotiate runs the msgCaps exchange on a fresh stream whose hellos both
// carried the tag, and returns what the peer speaks.
func (s *secureConn) negotiate(p wireProfile, name string) (peerWire, error) {
	if err := s.send(capsMsg(p, name)); err != nil {
		return peerWire{}, fmt.Errorf("sending capabilities: %w", err)
	}
	typ, body, err := s.recv(handshakeTimeout)
	if err != nil {
		return peerWire{}, fmt.Errorf("reading capabilities: %w", err)
	}
	if typ != msgCaps {
		return peerWire{}, fmt.Errorf("%w: expected capabilities, got type %d", errMalformed, typ)
	}
	rmin, rmax, caps, rname, err := decodeCaps(body)
	if err != nil {
		return peerWire{}, err
	}
	v := min(p.max, rmax)
	if v < max(p.min, rmin) {
		return peerWire{}, fmt.Errorf("%w: we speak %d..%d, %s speaks %d..%d", errNoCommonVersion, p.min, p.max, rname, rmin, rmax)
	}
	if s.peer == "" {
		s.peer = rname
	}
	return peerWire{Min: rmin, Max: rmax, Caps: caps, Version: v, Negotiated: true}, nil
}

// unknownMsg encodes msgUnknown, the reply to a request of type typ that
// this node does not know.
func unknownMsg(typ byte) []byte {
	e := newMsg(msgUnknown, 1)
	e.u8(typ)
	return e.b
}

// serveUnknown answers a request of a type this node's build does not
// serve: the test profile's own exchange, or msgUnknown. The stream goes
// on either way (an error means the stream failed).
func (n *Node) serveUnknown(sc *secureConn, typ byte, body []byte) error {
	if handled, err := n.serveExtra(sc, typ, body); handled {
		return err
	}
	n.log.Debug("answering a request of unknown type", "type", typ, "peer", sc.peer)
	return sc.send(unknownMsg(typ))
}

// decodeGossip decodes a gossiped message: msgRecords of any version (the
// fields a later version appended ignored), or an error wrapping errUnknownType
// for a type this release does not know.
func (n *Node) decodeGossip(msg []byte) ([]Record, error) {
	ver, typ, body, err := parseHeader(msg)
	if err != nil {
		return nil, err
	}
	switch {
	case typ == msgRecords && ver == protoVersion:
		return decodeRecords(body)
	case typ == msgRecords:
		return decodeRecordsPrefix(body)
	case typ < msgHello || typ > msgUnknown:
		return nil, fmt.Errorf("%w %d", errUnknownType, typ)
	default:
		return nil, fmt.Errorf("%w: unexpected gossip message type %d", errMalformed, typ)
	}
}
