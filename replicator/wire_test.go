package replicator

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
)

func sampleRecords() []Record {
	return []Record{
		{Bucket: "accounts", Key: "a1", Value: []byte(`{"name":"x"}`), Version: Version{Time: 1 << 20, Node: "alpha"}},
		{Bucket: "sessions", Key: "s", Version: Version{Time: 7, Node: "b"}, Deleted: true},
		{Bucket: "b", Key: strings.Repeat("k", MaxKeyLen), Value: []byte{}, Version: Version{Time: ^uint64(0), Node: "n"}},
	}
}

func TestRecordsRoundTrip(t *testing.T) {
	in := sampleRecords()
	msg := encodeRecords(msgRecords, in)
	typ, body, err := header(msg)
	if err != nil || typ != msgRecords {
		t.Fatalf("header: %d %v", typ, err)
	}
	out, err := decodeRecords(body)
	if err != nil {
		t.Fatal(err)
	}
	in[2].Value = nil // empty values decode as nil
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip:\n in %+v\nout %+v", in, out)
	}
}

func TestControlMessagesRoundTrip(t *testing.T) {
	dg := []bucketDigest{{"a", 1, 2}, {"b", 3, 4}}
	sender, gotDg, err := decodeDigest(encodeDigest("alpha", dg)[2:])
	if err != nil || sender != "alpha" || !reflect.DeepEqual(dg, gotDg) {
		t.Fatalf("digest: %q %v %v", sender, gotDg, err)
	}
	var br bucketRanges
	br.bucket = "x"
	br.hashes[0], br.hashes[255] = 1, 2
	gotR, err := decodeRanges(encodeRanges([]bucketRanges{br})[2:])
	if err != nil || len(gotR) != 1 || gotR[0] != br {
		t.Fatalf("ranges: %v %v", gotR, err)
	}
	sums := []bucketSummary{{bucket: "x", ranges: []rangeSummary{{r: 3, entries: []summaryEntry{{key: "k", m: meta{v: Version{5, "n"}, deleted: true}}}}}}}
	more, gotS, err := decodeSummary(encodeSummary(true, sums)[2:])
	if err != nil || !more || !reflect.DeepEqual(sums, gotS) {
		t.Fatalf("summary: %v %v %v", more, gotS, err)
	}
	ws := []bucketKeys{{bucket: "x", keys: []string{"a", "b"}}}
	gotW, err := decodeWant(encodeWant(ws)[2:])
	if err != nil || !reflect.DeepEqual(ws, gotW) {
		t.Fatalf("want: %v %v", gotW, err)
	}
}

func TestStoredRoundTrip(t *testing.T) {
	r := Record{Bucket: "b", Key: "k", Value: []byte("v"), Version: Version{42, "n"}}
	m, v, err := decodeStored(encodeStored(&r))
	if err != nil || m.v != r.Version || m.deleted || string(v) != "v" {
		t.Fatalf("stored: %v %q %v", m, v, err)
	}
	if _, _, err := decodeStored([]byte{2, 0}); err == nil {
		t.Fatal("unknown storage version accepted")
	}
}

func TestHeaderRejects(t *testing.T) {
	for _, msg := range [][]byte{nil, {1}, {2, msgRecords}, {1, 0}, {1, 200}} {
		if _, err := decodeMessage(msg); !errors.Is(err, errMalformed) {
			t.Errorf("decodeMessage(%v) = %v, want errMalformed", msg, err)
		}
	}
}

func TestDecodeRejectsInvalidRecords(t *testing.T) {
	bad := []Record{
		{Bucket: "", Key: "k", Version: Version{1, "n"}},
		{Bucket: "b", Key: "", Version: Version{1, "n"}},
		{Bucket: "b", Key: "k", Version: Version{1, ""}},
		{Bucket: "b", Key: "k", Version: Version{1, "n"}, Deleted: true, Value: []byte("x")},
	}
	for _, r := range bad {
		if _, err := decodeRecords(encodeRecords(msgRecords, []Record{r})[2:]); err == nil {
			t.Errorf("accepted %+v", r)
		}
	}
	// An oversized count must not allocate or panic.
	e := newMsg(msgRecords, 10)
	e.uvar(1 << 60)
	if _, err := decodeMessage(e.b); err == nil {
		t.Error("accepted huge count")
	}
	// Trailing bytes.
	msg := append(encodeRecords(msgRecords, sampleRecords()[:1]), 0)
	if _, err := decodeMessage(msg); err == nil {
		t.Error("accepted trailing bytes")
	}
}

// validMessages returns one valid message of every type.
func validMessages() [][]byte {
	var br bucketRanges
	br.bucket = "b"
	ack := newMsg(msgAck, 1)
	ack.uvar(3)
	leave := newMsg(msgLeave, 2)
	leave.str("n")
	return [][]byte{
		helloMsg(make([]byte, nonceLen)),
		encodeRecords(msgRecords, sampleRecords()),
		encodeRecords(msgReplicate, sampleRecords()[:1]),
		ack.b,
		encodeDigest("n", []bucketDigest{{"b", 1, 1}}),
		encodeRanges([]bucketRanges{br}),
		encodeSummary(false, []bucketSummary{{bucket: "b", ranges: []rangeSummary{{r: 1, entries: []summaryEntry{{key: "k", m: meta{v: Version{1, "n"}}}}}}}}),
		encodeWant([]bucketKeys{{bucket: "b", keys: []string{"k"}}}),
		newMsg(msgEnd, 0).b,
		leave.b,
	}
}

// TestDecodeGarbage feeds random and mutated messages to the decoders: they
// must return errors, never panic.
func TestDecodeGarbage(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	valid := validMessages()
	for _, m := range valid {
		if _, err := decodeMessage(m); err != nil {
			t.Fatalf("valid message %v rejected: %v", m[:2], err)
		}
	}
	for i := 0; i < 200000; i++ {
		var msg []byte
		switch i % 3 {
		case 0: // random bytes with a valid header
			msg = make([]byte, rng.IntN(64))
			for j := range msg {
				msg[j] = byte(rng.UintN(256))
			}
			if len(msg) >= 2 {
				msg[0], msg[1] = protoVersion, byte(1+rng.IntN(msgLeave))
			}
		case 1: // a valid message with flipped bytes
			msg = bytes.Clone(valid[rng.IntN(len(valid))])
			for k := 0; k < 1+rng.IntN(3); k++ {
				msg[rng.IntN(len(msg))] = byte(rng.UintN(256))
			}
		case 2: // a truncated valid message
			v := valid[rng.IntN(len(valid))]
			msg = v[:rng.IntN(len(v))]
		}
		decodeMessage(msg)
		decodeStored(msg)
	}
}

// FuzzDecode runs the decoders on arbitrary input (go test -fuzz=FuzzDecode).
func FuzzDecode(f *testing.F) {
	for _, m := range validMessages() {
		f.Add(m)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		typ, err := decodeMessage(msg)
		if err == nil && (typ < msgHello || typ > msgTree) {
			t.Fatalf("accepted type %d", typ)
		}
		decodeStored(msg)
	})
}
