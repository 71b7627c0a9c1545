package replicator

import (
	"testing"
	"time"
)

// TestReturnAfterHorizonRecordsReceivedLast: like
// TestReturnAfterHorizonDoesNotResurrect, but b goes away right after a's
// records reached it by replication, before an exchange of b's covered
// them (its last sync is older than the records). A record deleted and
// collected while b was away must not come back from b either.
func TestReturnAfterHorizonRecordsReceivedLast(t *testing.T) {
	clock := &offsetClock{}
	dir := t.TempDir()
	ca, cb, cc := testConfig(t, dir, "a"), testConfig(t, dir, "b"), testConfig(t, dir, "c")
	for _, c := range []*Config{&ca, &cb, &cc} {
		clock.set(c)
		c.AntiEntropyInterval = 200 * time.Millisecond
	}
	a := open(t, ca)
	cb.Join, cc.Join = []string{a.Addr()}, []string{a.Addr()}
	b, c := open(t, cb), open(t, cc)
	waitConverged(t, a, b, c)
	// b completed exchanges; stop its own and keep it from answering any
	// (a short AntiEntropyInterval elsewhere still pushes records to it).
	rounds := b.Stats().AntiEntropyRounds
	waitFor(t, 10*time.Second, "b's anti-entropy rounds", func() bool { return b.Stats().AntiEntropyRounds >= rounds+2 })
	b.shutdown(false)
	waitFor(t, 10*time.Second, "b dead", func() bool { return aliveCount(a) == 2 && aliveCount(c) == 2 })
	last := b.Stats().LastSync
	b.Close()

	// The records reach b only now, stamped after its last sync: b's data
	// file gets them as replication would have delivered them.
	cb.Join = nil
	cb.AntiEntropyInterval = time.Hour
	clock.advance(2 * time.Second)
	ctx := ctxT(t)
	if err := a.PutAll(ctx, "acct", "doomed", []byte("v")); err != nil {
		t.Fatal(err)
	}
	rec, err := a.Get("acct", "doomed")
	if err != nil {
		t.Fatal(err)
	}
	if !rec.Version.WallTime().After(last) {
		t.Fatalf("record %v not after b's last sync %v", rec.Version.WallTime(), last)
	}
	bAlone, err := Open(cb)
	if err != nil {
		t.Fatal(err)
	}
	if err := bAlone.applyRemote([]Record{rec}, false); err != nil {
		t.Fatal(err)
	}
	if !valueIs(bAlone, "acct", "doomed", "v") {
		t.Fatal("b did not take the record")
	}
	bAlone.Close()

	if err := a.Delete(ctx, "acct", "doomed"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "tombstone on c", func() bool { return absent(c, "acct", "doomed") })
	clock.advance(pastHorizon(ca))
	collectAfterExchanges(t, a, c)

	// b comes back.
	cb.Join = []string{a.Addr()}
	b2, err := Open(cb)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b2.Close() })
	if err := b2.PutAsync("acct", "new-on-b", []byte("v")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "b caught up", func() bool {
		return valueIs(a, "acct", "new-on-b", "v") && valueIs(c, "acct", "new-on-b", "v")
	})
	rounds = b2.Stats().AntiEntropyRounds
	waitFor(t, 20*time.Second, "more exchanges", func() bool { return b2.Stats().AntiEntropyRounds >= rounds+3 })
	for _, n := range []*Node{a, b2, c} {
		if !absent(n, "acct", "doomed") {
			t.Fatalf("%s: the record deleted (and collected) while b was away is back", n.Name())
		}
	}
}
