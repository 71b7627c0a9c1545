package replicator

import (
	"bytes"
	"fmt"
	"math/bits"
	"testing"
	"time"
)

// TestAntiEntropyMetadataFollowsTheDifference: two nodes sharing 100k
// records that differ in 100 exchange metadata (hashes, key listings,
// wants) proportional to 100 · log n, not to n.
func TestAntiEntropyMetadataFollowsTheDifference(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 100k records into two nodes")
	}
	const total, differ = 100_000, 100
	dir := t.TempDir()
	ca, cb := testConfig(t, dir, "a"), testConfig(t, dir, "b")
	ca.AntiEntropyInterval, cb.AntiEntropyInterval = time.Hour, time.Hour // only the exchanges on meeting
	a, b := open(t, ca), open(t, cb)
	val := bytes.Repeat([]byte("v"), 20)
	for start := 0; start < total; start += 10_000 {
		batch := make([]Record, 0, 10_000)
		for i := start; i < start+10_000; i++ {
			bucket := "accounts"
			if i%4 == 0 {
				bucket = "sessions"
			}
			batch = append(batch, Record{Bucket: bucket, Key: fmt.Sprintf("key-%06d", i), Value: val, Version: Version{Time: uint64(i + 1), Node: "seed"}})
		}
		if err := a.applyRemote(batch, false); err != nil {
			t.Fatal(err)
		}
		if err := b.applyRemote(batch, false); err != nil {
			t.Fatal(err)
		}
	}
	// 100 differences, applied without gossip: 50 keys only a has, 50 keys
	// b holds a newer version of.
	var onA, onB []Record
	for i := range differ / 2 {
		onA = append(onA, Record{Bucket: "accounts", Key: fmt.Sprintf("only-a-%d", i), Value: val, Version: Version{Time: total + 10, Node: "seed"}})
		onB = append(onB, Record{Bucket: "accounts", Key: fmt.Sprintf("key-%06d", 1+4*i*499), Value: []byte("newer"), Version: Version{Time: total + 10, Node: "seed"}})
	}
	if err := a.applyRemote(onA, false); err != nil {
		t.Fatal(err)
	}
	if err := b.applyRemote(onB, false); err != nil {
		t.Fatal(err)
	}

	if _, err := b.ml.Load().Join([]string{a.Addr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "convergence", func() bool {
		return bytes.Equal(digestBytes(a), digestBytes(b)) && a.Stats().AntiEntropyRounds >= 2
	})
	sa, sb := a.Stats(), b.Stats()
	if sa.Records != total+differ/2 || sb.Records != sa.Records || !valueIs(a, "accounts", "key-000001", "newer") {
		t.Fatalf("records a=%d b=%d, or b's newer version did not reach a", sa.Records, sb.Records)
	}
	metaBytes := sa.AntiEntropyMetaBytes + sb.AntiEntropyMetaBytes
	metaKeys := sa.AntiEntropyMetaKeys + sb.AntiEntropyMetaKeys
	t.Logf("%d records, %d differing: %d bytes and %d keys of metadata in %d+%d rounds; %d+%d records shipped",
		total, differ, metaBytes, metaKeys, sa.AntiEntropyRounds, sb.AntiEntropyRounds, sa.AntiEntropySent, sb.AntiEntropySent)
	// O(differ · log n): 64 bytes per difference per level of a binary
	// split of the key space, twice (both nodes start an exchange when they
	// meet, and the two can overlap). Today's range listings send ~1 MiB.
	log2n := uint64(bits.Len(total))
	if bound := 2 * 64 * differ * log2n; metaBytes > bound {
		t.Fatalf("anti-entropy sent %d bytes of metadata for %d differences among %d records; bound %d (64 B per difference and level, two exchanges)", metaBytes, differ, total, bound)
	}
	if bound := 2 * 16 * uint64(differ); metaKeys > bound {
		t.Fatalf("anti-entropy listed %d keys for %d differences; bound %d", metaKeys, differ, bound)
	}
}

// digestBytes renders n's bucket digests for comparison.
func digestBytes(n *Node) []byte {
	n.mu.Lock()
	d := n.ix.digest()
	n.mu.Unlock()
	return []byte(fmt.Sprint(d))
}

// TestTreeExchangeFallsBackToDigests: a node of an earlier release (closes
// the stream on msgSync) still syncs both ways with a current one.
func TestTreeExchangeFallsBackToDigests(t *testing.T) {
	dir := t.TempDir()
	ca, cb := testConfig(t, dir, "new"), testConfig(t, dir, "old")
	cb.DigestExchangeOnly = true
	a, b := open(t, ca), open(t, cb)
	var onA, onB []Record
	for i := range 20 {
		onA = append(onA, Record{Bucket: "x", Key: fmt.Sprintf("a-%d", i), Value: []byte("v"), Version: Version{Time: uint64(i + 1), Node: "new"}})
		onB = append(onB, Record{Bucket: "x", Key: fmt.Sprintf("b-%d", i), Value: []byte("v"), Version: Version{Time: uint64(i + 1), Node: "old"}})
	}
	if err := a.applyRemote(onA, false); err != nil {
		t.Fatal(err)
	}
	if err := b.applyRemote(onB, false); err != nil {
		t.Fatal(err)
	}
	if _, err := b.ml.Load().Join([]string{a.Addr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "both ways", func() bool {
		return a.Stats().Records == 40 && b.Stats().Records == 40
	})
	rounds := a.Stats().AntiEntropyRounds
	waitFor(t, 20*time.Second, "more exchanges", func() bool { return a.Stats().AntiEntropyRounds >= rounds+4 })
	if !a.isLegacy("old") {
		t.Fatal("the current node did not fall back to the digest exchange")
	}
	if err := a.Put(ctxT(t), "x", "later", []byte("v")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "a later write", func() bool { return valueIs(b, "x", "later", "v") })
}

// TestNewNodeGetsRecordsWithoutListings: a node joining empty receives the
// records without either side listing keys.
func TestNewNodeGetsRecordsWithoutListings(t *testing.T) {
	const total = 10_000
	dir := t.TempDir()
	ca, cb := testConfig(t, dir, "a"), testConfig(t, dir, "b")
	ca.AntiEntropyInterval, cb.AntiEntropyInterval = time.Hour, time.Hour
	a := open(t, ca)
	batch := make([]Record, 0, total)
	for i := range total {
		batch = append(batch, Record{Bucket: fmt.Sprintf("b%d", i%3), Key: fmt.Sprintf("key-%05d", i), Value: []byte("v"), Version: Version{Time: uint64(i + 1), Node: "seed"}})
	}
	if err := a.applyRemote(batch, false); err != nil {
		t.Fatal(err)
	}
	cb.Join = []string{a.Addr()}
	b := open(t, cb)
	waitFor(t, 30*time.Second, "b has everything", func() bool { return b.Stats().Records == total })
	waitFor(t, 10*time.Second, "both exchanges", func() bool { return a.Stats().AntiEntropyRounds >= 2 })
	sa, sb := a.Stats(), b.Stats()
	t.Logf("metadata: %d bytes, %d keys; records sent %d", sa.AntiEntropyMetaBytes+sb.AntiEntropyMetaBytes, sa.AntiEntropyMetaKeys+sb.AntiEntropyMetaKeys, sa.AntiEntropySent)
	if keys := sa.AntiEntropyMetaKeys + sb.AntiEntropyMetaKeys; keys != 0 {
		t.Fatalf("%d keys listed to sync an empty node", keys)
	}
	if bytes := sa.AntiEntropyMetaBytes + sb.AntiEntropyMetaBytes; bytes > 1024 {
		t.Fatalf("%d bytes of metadata to sync an empty node", bytes)
	}
}
