package replicator

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	bolt "go.etcd.io/bbolt"
)

// These tests play a node of a later release by hand (raw frames on a
// replication stream, raw gossip messages): what a next release sends
// must not cut it off from a node of this one.

// rawStream dials n's replication endpoint and runs the dialer's side of
// the handshake, as a node of the previous release (b4e49ea) does.
func rawStream(t *testing.T, n *Node) *secureConn {
	t.Helper()
	c, err := n.mux.DialAddressTimeout(memberlist.Address{Addr: n.Addr(), Name: n.Name()}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	sc := &secureConn{c: c}
	if err := sc.handshake(n.streamKey, legacyWire, "", true); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	return sc
}

func replicateOn(t *testing.T, sc *secureConn, rec Record) {
	t.Helper()
	if err := sc.send(encodeRecords(msgReplicate, []Record{rec})); err != nil {
		t.Fatalf("sending replicate: %v", err)
	}
	typ, _, err := sc.recv(5 * time.Second)
	if err != nil || typ != msgAck {
		t.Fatalf("replicate after the earlier messages: reply type %d, %v; want an ack on the same stream", typ, err)
	}
}

// An unknown request type on a stream (a later release's new exchange)
// gets a defined "unknown" reply, and the stream goes on.
func TestStreamUnknownRequestGetsUnknownReply(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "a"))
	sc := rawStream(t, n)
	if err := sc.send([]byte{1, 200, 'x', 'y'}); err != nil {
		t.Fatal(err)
	}
	typ, body, err := sc.recv(5 * time.Second)
	const unknownReply = 12 // msgUnknown
	if err != nil && !strings.Contains(err.Error(), "unknown request") {
		t.Fatalf("reply to an unknown request type: %v; want the defined unknown reply", err)
	}
	if err == nil && (typ != unknownReply || len(body) < 1 || body[0] != 200) {
		t.Fatalf("reply to an unknown request type: type %d body %v; want type %d naming 200", typ, body, unknownReply)
	}
	replicateOn(t, sc, Record{Bucket: "b", Key: "k", Value: []byte("v"), Version: Version{Time: 1 << 20, Node: "x"}})
	waitFor(t, 5*time.Second, "replicated record", func() bool { return valueIs(n, "b", "k", "v") })
}

// A stream whose dialer says hello in the next wire version still
// replicates.
func TestStreamNextVersionHello(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "a"))
	c, err := n.mux.DialAddressTimeout(memberlist.Address{Addr: n.Addr(), Name: n.Name()}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The hello of a release speaking wire version 2.
	nonce := make([]byte, nonceLen)
	hello := append([]byte{streamMagic, 2, msgHello}, nonce...)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	var reply [2 + nonceLen]byte
	if _, err := c.Read(reply[:1]); err != nil {
		t.Fatalf("a node of this release hung up on a version-2 hello: %v", err)
	}
}

// A gossiped record message of a later version (a field appended to the
// message) is applied: the fields this release knows are read, the rest
// ignored.
func TestGossipNextVersionRecordsApplied(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "a"))
	msg := encodeRecords(msgRecords, []Record{{Bucket: "b", Key: "g", Value: []byte("v2"), Version: Version{Time: 1 << 20, Node: "x"}}})
	msg[0] = 2
	msg = append(msg, 3, 'n', 'e', 'w') // an optional field of version 2
	n.handleGossip(msg)
	waitFor(t, 5*time.Second, "gossiped record of wire version 2", func() bool { return valueIs(n, "b", "g", "v2") })
}

// warnCounter counts log records at Warn and above.
type warnCounter struct {
	mu    sync.Mutex
	warns []string
}

func (w *warnCounter) Enabled(context.Context, slog.Level) bool { return true }
func (w *warnCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		w.mu.Lock()
		w.warns = append(w.warns, r.Message)
		w.mu.Unlock()
	}
	return nil
}
func (w *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnCounter) WithGroup(string) slog.Handler      { return w }

// An unknown gossip message type (a later release's new broadcast) is
// ignored quietly, not reported as a bad peer.
func TestGossipUnknownTypeIgnored(t *testing.T) {
	wc := &warnCounter{}
	cfg := testConfig(t, t.TempDir(), "a")
	cfg.Logger = slog.New(wc)
	n := open(t, cfg)
	n.handleGossip([]byte{1, 200, 1, 2, 3})
	n.handleGossip([]byte{2, 201})
	wc.mu.Lock()
	defer wc.mu.Unlock()
	if len(wc.warns) != 0 {
		t.Fatalf("unknown gossip types logged as warnings: %q", wc.warns)
	}
}

// A data directory written by a newer Circle (a higher format in the meta
// bucket) is refused with a clear message, not opened.
func TestDataFormatNewerRefused(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir, "a")
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(filepath.Join(cfg.DataDir, DBFile), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		m, err := tx.CreateBucketIfNotExists([]byte("meta"))
		if err != nil {
			return err
		}
		return m.Put([]byte("format"), binary.BigEndian.AppendUint32(nil, 99))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	n, err := Open(cfg)
	if err == nil {
		n.Close()
		t.Fatal("a data dir of format 99 was opened")
	}
	want := "data in " + cfg.DataDir + " was written by a newer Circle (format 99); this build reads format <= "
	if !errors.Is(err, ErrDataFormat) {
		t.Errorf("error %v does not wrap ErrDataFormat", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
}

// A new data directory, and one of the previous release (no format),
// carry the format after the first start.
func TestDataFormatStamped(t *testing.T) {
	cfg := testConfig(t, t.TempDir(), "a")
	n := open(t, cfg)
	var got []byte
	n.db.View(func(tx *bolt.Tx) error {
		got = append(got, tx.Bucket([]byte("meta")).Get([]byte("format"))...)
		return nil
	})
	if len(got) != 4 || binary.BigEndian.Uint32(got) == 0 {
		t.Fatalf("meta format = %v; want a u32 format version", got)
	}
}

// mixedCircle starts nodes speaking the given profiles (nil: this
// release, also in a circle_nextwire build) with replicas = all, so every
// write waits for every node's ack.
func mixedCircle(t *testing.T, profiles []*wireProfile, logs []*warnCounter) []*Node {
	t.Helper()
	i := 0
	return cluster(t, len(profiles), func(c *Config) {
		c.wire = profiles[i]
		if c.wire == nil {
			c.wire = &currentWire
		}
		c.Replicas = len(profiles)
		if logs != nil && logs[i] != nil {
			c.Logger = slog.New(logs[i])
		}
		i++
	})
}

// checkMixedCircle checks that every node's acknowledged writes and
// anti-entropy reach every other node.
func checkMixedCircle(t *testing.T, nodes []*Node) {
	t.Helper()
	for i, w := range nodes {
		key := "put-" + w.Name()
		if err := w.Put(ctxT(t), "b", key, []byte("v")); err != nil {
			t.Fatalf("Put on %s (acknowledged by every node): %v", w.Name(), err)
		}
		for _, r := range nodes {
			if !valueIs(r, "b", key, "v") {
				t.Fatalf("%s lacks %s's acknowledged write", r.Name(), w.Name())
			}
		}
		// A record only anti-entropy can spread: stored on w without gossip.
		ae := Record{Bucket: "b", Key: "ae-" + w.Name(), Value: []byte("v"), Version: Version{Time: uint64(1<<40 + i), Node: w.Name()}}
		if err := w.applyRemote([]Record{ae}, false); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 20*time.Second, "anti-entropy between all nodes", func() bool {
		for _, r := range nodes {
			for _, w := range nodes {
				if !valueIs(r, "b", "ae-"+w.Name(), "v") {
					return false
				}
			}
		}
		return true
	})
}

// warnsAbout returns the warnings that mention gossip or streams.
func (w *warnCounter) wireWarnings() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, m := range w.warns {
		if strings.Contains(m, "gossip") || strings.Contains(m, "stream") || strings.Contains(m, "message") {
			out = append(out, m)
		}
	}
	return out
}

// The fault suite's scenario "a circle with one node on the next wire
// version", in process: writes both ways with every node's ack,
// anti-entropy both ways, and the next node's unknown requests and gossip
// are answered or ignored without dropping anyone.
func TestCircleWithNextWireNode(t *testing.T) {
	logs := []*warnCounter{{}, {}, nil}
	nodes := mixedCircle(t, []*wireProfile{nil, nil, &nextWire}, logs)
	next := nodes[2]
	checkMixedCircle(t, nodes)
	waitFor(t, 20*time.Second, "the next node's probes answered with msgUnknown", func() bool {
		return next.nextStats().unknown >= 3
	})
	if s := next.nextStats(); s.answered != 0 {
		t.Errorf("a node of this release echoed the next release's probe: %+v", s)
	}
	for _, n := range nodes[:2] {
		pw, ok := n.peerCaps(next.Name())
		if !ok || !pw.Negotiated || pw.Max != 2 || !pw.Caps.has(capNextProbe) || pw.Version != 1 {
			t.Errorf("%s: peerCaps(%s) = %+v, %v; want negotiated 1..2 with capNextProbe, speaking 1", n.Name(), next.Name(), pw, ok)
		}
		if pw, ok := next.peerCaps(n.Name()); !ok || !pw.Negotiated || pw.Max != 1 || pw.Version != 1 {
			t.Errorf("%s: peerCaps(%s) = %+v, %v; want negotiated, max 1", next.Name(), n.Name(), pw, ok)
		}
	}
	// Writes still flow after the probes (the streams went on).
	checkMixedCircleAgain(t, nodes)
	for i, l := range logs[:2] {
		if w := l.wireWarnings(); len(w) != 0 {
			t.Errorf("%s warned about the next node's messages: %q", nodes[i].Name(), w)
		}
	}
}

func checkMixedCircleAgain(t *testing.T, nodes []*Node) {
	t.Helper()
	for _, w := range nodes {
		if err := w.Put(ctxT(t), "b", "again-"+w.Name(), []byte("v")); err != nil {
			t.Fatalf("Put on %s after the probes: %v", w.Name(), err)
		}
	}
}

// Two next-wire nodes speak version 2 with each other and serve their own
// exchange; with a node of this release they speak version 1.
func TestNextWireNodesSpeakVersion2(t *testing.T) {
	nodes := mixedCircle(t, []*wireProfile{&nextWire, &nextWire, nil}, nil)
	checkMixedCircle(t, nodes)
	waitFor(t, 20*time.Second, "probes between next-wire nodes echoed", func() bool {
		return nodes[0].nextStats().answered >= 1 && nodes[1].nextStats().answered >= 1
	})
	if pw, _ := nodes[0].peerCaps(nodes[1].Name()); pw.Version != 2 {
		t.Errorf("next-wire pair speaks version %d, want 2", pw.Version)
	}
	if pw, _ := nodes[0].peerCaps(nodes[2].Name()); pw.Version != 1 {
		t.Errorf("next-wire node and this release speak version %d, want 1", pw.Version)
	}
}

// A node with the previous release's handshake (untagged hello, no
// msgCaps) replicates both ways with this release and the next one, which
// see it as legacy and send it nothing it does not know.
func TestLegacyHandshakeInterop(t *testing.T) {
	nodes := mixedCircle(t, []*wireProfile{nil, &legacyWire, &nextWire}, nil)
	checkMixedCircle(t, nodes)
	for _, n := range []*Node{nodes[0], nodes[2]} {
		if pw, ok := n.peerCaps(nodes[1].Name()); !ok || pw.Negotiated || pw.Version != 1 {
			t.Errorf("%s: peerCaps(legacy) = %+v, %v; want not negotiated, version 1", n.Name(), pw, ok)
		}
	}
}

// Two nodes without a common version do not talk (and say why).
func TestNoCommonWireVersion(t *testing.T) {
	only2 := wireProfile{min: 2, max: 2, caps: capTolerant}
	cfgA := testConfig(t, t.TempDir(), "a")
	cfgA.wire = &currentWire
	a := open(t, cfgA)
	cfg := testConfig(t, t.TempDir(), "b")
	cfg.wire = &only2
	b := open(t, cfg)
	_, err := b.dial(ctxT(t), &peerRef{Name: "a", Addr: a.Addr()})
	if !errors.Is(err, errNoCommonVersion) {
		t.Fatalf("dial between versions 1..1 and 2..2: %v, want errNoCommonVersion", err)
	}
}
