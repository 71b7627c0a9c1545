package replicator

import (
	"fmt"
	"sync"
	"testing"
)

// TestGroupCommitConcurrentWriters: concurrent local writes and records
// from peers, committed in shared transactions, are all stored durably
// with distinct versions; in a first-writer-wins bucket exactly one of
// several racing writers wins.
func TestGroupCommitConcurrentWriters(t *testing.T) {
	cfg := testConfig(t, t.TempDir(), "solo")
	n := open(t, cfg)
	const writers, each = 16, 40
	var wg sync.WaitGroup
	errs := make(chan error, writers*each+writers)
	for w := range writers {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for i := range each {
				if err := n.PutAsync("b", fmt.Sprintf("w%d-%d", w, i), []byte("v")); err != nil {
					errs <- err
				}
			}
		}()
		go func() {
			defer wg.Done()
			errs <- n.applyRemote([]Record{{Bucket: "r", Key: fmt.Sprintf("r%d", w), Value: []byte("v"), Version: Version{Time: 1, Node: "peer"}}}, false)
			errs <- n.PutAsync("fww", "claimed", []byte(fmt.Sprint(w)))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	recs, err := n.List("b", "")
	if err != nil || len(recs) != writers*each {
		t.Fatalf("%d records, %v", len(recs), err)
	}
	seen := map[uint64]bool{}
	for _, r := range recs {
		if seen[r.Version.Time] {
			t.Fatalf("version %v used twice", r.Version)
		}
		seen[r.Version.Time] = true
	}
	first, err := n.Get("fww", "claimed")
	if err != nil {
		t.Fatal(err)
	}
	n.shutdown(false)
	n2 := open(t, cfg)
	if st := n2.Stats(); st.Records != writers*each+writers+1 {
		t.Fatalf("after reopening: %d records", st.Records)
	}
	if again, err := n2.Get("fww", "claimed"); err != nil || string(again.Value) != string(first.Value) {
		t.Fatalf("first-writer-wins record changed: %v %v", again, err)
	}
}
