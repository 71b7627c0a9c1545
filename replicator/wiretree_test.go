package replicator

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
)

func sampleTurn() ([]bucketKeys, []treeItem) {
	wants := []bucketKeys{{bucket: "b", keys: []string{"k1", "k2"}}}
	var kids [treeFanout]tnode
	for i := range kids {
		kids[i] = tnode{hash: uint64(i) * 7, count: i}
	}
	items := []treeItem{
		{bucket: "b", kind: itemRoot, node: tnode{hash: 42, count: 3}},
		{bucket: "b", depth: 2, prefix: 0xab, kind: itemChildren, kids: kids},
		{bucket: "c", depth: 16, prefix: 1<<63 + 5, kind: itemEntries, entries: []summaryEntry{
			{key: "x", m: meta{v: Version{5, "n"}}}, {key: "y", m: meta{v: Version{6, "m"}, deleted: true}}}},
		{bucket: "c", depth: 5, prefix: 3, kind: itemEntries, entries: []summaryEntry{}},
	}
	return wants, items
}

func decodeFrames(t *testing.T, frames [][]byte) (string, treeTurn) {
	t.Helper()
	var turn treeTurn
	var sender string
	for i, f := range frames {
		typ, body, err := header(f)
		if err != nil {
			t.Fatal(err)
		}
		s, more, err := decodeTurnFrame(body, typ == msgSync, &turn)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if i == 0 {
			sender = s
		}
		if more != (i < len(frames)-1) {
			t.Fatalf("frame %d: more=%v of %d frames", i, more, len(frames))
		}
	}
	return sender, turn
}

func TestTurnRoundTrip(t *testing.T) {
	wants, items := sampleTurn()
	frames, keys := encodeTurn("alpha", 1234, wants, items)
	if len(frames) != 1 || frames[0][1] != msgSync || keys != 4 {
		t.Fatalf("%d frames, type %d, %d keys", len(frames), frames[0][1], keys)
	}
	sender, turn := decodeFrames(t, frames)
	if sender != "alpha" || turn.lastSync != 1234 || !reflect.DeepEqual(turn.wants, wants) || !reflect.DeepEqual(turn.items, items) {
		t.Fatalf("round trip: %q %d %+v %+v", sender, turn.lastSync, turn.wants, turn.items)
	}
	if _, err := decodeMessage(frames[0]); err != nil {
		t.Fatal(err)
	}
	// A large turn is split into frames of about chunkBytes.
	var many []treeItem
	for i := range 20000 {
		many = append(many, treeItem{bucket: "b", depth: 16, prefix: uint64(i), kind: itemEntries,
			entries: []summaryEntry{{key: strings.Repeat("k", 40) + fmt.Sprint(i), m: meta{v: Version{1, "n"}}}}})
	}
	frames, _ = encodeTurn("", 1, wants, many)
	if len(frames) < 2 {
		t.Fatalf("%d frames for %d items", len(frames), len(many))
	}
	for _, f := range frames {
		if f[1] != msgTree || len(f) > 2*chunkBytes {
			t.Fatalf("frame type %d, %d bytes", f[1], len(f))
		}
	}
	_, turn = decodeFrames(t, frames)
	if len(turn.items) != len(many) || !reflect.DeepEqual(turn.wants, wants) {
		t.Fatalf("%d items, wants %+v", len(turn.items), turn.wants)
	}
}

func TestTurnRejects(t *testing.T) {
	bad := []treeItem{
		{bucket: "b", depth: 17, kind: itemEntries},
		{bucket: "b", depth: 1, prefix: 16, kind: itemEntries},
		{bucket: "b", depth: 1, kind: itemRoot},
		{bucket: "b", depth: 16, kind: itemChildren},
		{bucket: "", kind: itemRoot},
		{bucket: "b", kind: 9},
	}
	for _, it := range bad {
		frames, _ := encodeTurn("", 0, nil, []treeItem{it})
		if _, err := decodeMessage(frames[0]); err == nil {
			t.Errorf("accepted %+v", it)
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	wants, items := sampleTurn()
	frames, _ := encodeTurn("alpha", 1, wants, items)
	for i := 0; i < 50000; i++ {
		msg := bytes.Clone(frames[0])
		if i%2 == 0 {
			msg = msg[:rng.IntN(len(msg))]
		} else {
			for k := 0; k < 1+rng.IntN(3); k++ {
				msg[2+rng.IntN(len(msg)-2)] = byte(rng.UintN(256))
			}
		}
		decodeMessage(msg) // must not panic
	}
}
